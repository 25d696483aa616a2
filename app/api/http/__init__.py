"""HTTP plumbing every protocol shares: middleware (request ids, access log, API key, body
limit), the open-requests counter (drain, cancel on disconnect), the JSON error answers, body
parsing, uvicorn's limits, and the dependencies routes take (runtime, admission)."""

"""The /v1 API: detect (with its plain-ASGI fast path), render, models, jobs; `protocol.py`
holds the request and response models, `encode.py` builds the JSON answer from arrays."""

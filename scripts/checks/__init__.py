"""Operational checks against a real server or the engine: the chaos run, the hostile payloads
of the security suite and the soak, failed model loads, model swaps under load, and parity
checks (Ultralytics, decode-time reduction)."""

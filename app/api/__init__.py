"""The HTTP side of the service: one folder per protocol, thin adapters over the service.

- `v1/`: /v1/detect, /v1/render, /v1/models, /v1/jobs; `protocol.py` holds their models,
  `encode.py` the JSON answer built from arrays.
- `kserve/`: the KServe Open Inference Protocol v2 (REST routes, protocol models, request
  parsing, binary tensor data, tensors and metadata, Triton's repository extension, gRPC).
- `http/`: plumbing every protocol shares (middleware, open requests, error answers, body
  parsing, server limits, dependencies).
- `health.py` (/healthz, /readyz, /metrics) and `page.py` (the page at /).

Routes never import torch.
"""

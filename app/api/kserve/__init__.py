"""KServe Open Inference Protocol v2, REST and gRPC.

- `routes.py`: the REST routes (health, metadata, infer); `errors.py`: their errors in the
  protocol's shape; `repository.py`: Triton's model repository extension.
- `protocol.py`: the protocol's models (request header, answers) and the parsed request.
- `request.py`: where a v2 request is parsed (REST body or gRPC fields -> InferRequest), with
  `binary.py` (the binary tensor data extension) and `options.py` (parameters -> options).
- `tensors.py`: the model's input and output tensors, answers as tensors, metadata.
- `grpc/`: the same protocol over gRPC.
"""

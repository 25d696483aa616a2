"""KServe Open Inference Protocol v2: REST routes, protocol codec, repository extension, gRPC."""

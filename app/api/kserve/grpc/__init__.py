"""KServe Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`).

`servicer.py` answers the RPCs through the same DetectionService, codec and limits as the REST
routes (app/api/kserve/routes.py); `server.py` runs a grpc.aio server on `--grpc-port` inside each
front-end worker. The messages and service stubs are tritonclient's generated ones
(`tritonclient.grpc.service_pb2`, from Triton's grpc_service.proto, which extends KServe's
grpc_predict_v2.proto with the same package and service name): stock clients use the very same.
"""

"""The gRPC server of one front-end worker: a grpc.aio server on the worker's event loop.

Every front-end worker binds `--grpc-port` with SO_REUSEPORT and the kernel spreads the
connections among them, as uvicorn's shared socket spreads HTTP ones; the supervisor checks
first that no other program holds the port (app/api/kserve/grpc/port.py).
"""

from __future__ import annotations

import logging

import grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from app.api.kserve.grpc.port import GrpcPortInUseError, grpc_address
from app.api.kserve.grpc.servicer import KServeServicer
from app.config import Settings
from app.process.runtime import Runtime

logger = logging.getLogger(__name__)


async def start_grpc_server(
    settings: Settings, runtime: Runtime, version: str, *, workers: int = 1
) -> grpc.aio.Server:
    """Serve the v2 GRPCInferenceService on `settings.grpc_port` until `stop()`. The limits
    mirror HTTP's: a message is at most max_upload_bytes (larger: RESOURCE_EXHAUSTED, refused
    by gRPC before it is read), and a worker runs at most its share of max_connections calls at
    once (more: RESOURCE_EXHAUSTED)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_upload_bytes),
            ("grpc.so_reuseport", 1 if workers > 1 else 0),
        ],
        maximum_concurrent_rpcs=max(1, -(-settings.max_connections // workers)),
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(runtime, version), server)
    address = grpc_address(settings)
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc says only "Failed to bind to address"
        raise GrpcPortInUseError(f"gRPC could not bind {address}: {exc}") from None
    await server.start()
    logger.info("gRPC (KServe v2) on %s", address)
    return server

"""The gRPC port, checked by the supervisor before the workers bind it (no grpc import here:
the supervisor starts the engine processes after this)."""

from __future__ import annotations

import errno
import socket

from app.config import Settings


class GrpcPortInUseError(RuntimeError):
    pass


def grpc_address(settings: Settings) -> str:
    host = settings.host
    return f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"


def check_port_free(settings: Settings) -> None:
    """Refuse to start when another program listens on the gRPC port: the workers bind it
    with SO_REUSEPORT, which would let a second server share its connections silently,
    whereas a bind without it fails whenever any socket holds the port."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As grpc binds (SO_REUSEADDR): a closed connection in TIME_WAIT does not count, a
        # listening socket does (Linux).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, settings.grpc_port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise GrpcPortInUseError(
                f"the gRPC port {settings.grpc_port} on {settings.host} is in use: choose "
                "another with --grpc-port (DETR_SERVE_GRPC_PORT), or 0 for no gRPC"
            ) from None

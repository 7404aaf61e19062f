"""Local stand-ins for what an ``--address`` can point at, without Ray: an HTTP server (like the
dashboard), a port that accepts connections and never answers, and a gRPC server answering the GCS
call ``check_ray_address`` makes, optionally wanting a token (as a head with ``RAY_AUTH_MODE=token``
does)."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from concurrent import futures


@contextlib.contextmanager
def http_server():
    """``127.0.0.1:PORT`` of an HTTP/1 server (what the dashboard port looks like to a gRPC
    client)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def silent_port():
    """``127.0.0.1:PORT`` that completes TCP connections (the kernel's backlog) and never says a
    word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def fake_gcs(token: str | None = None):
    """``127.0.0.1:PORT`` of a gRPC server that answers the GCS's GetClusterId; with ``token``, only
    to ``Bearer token`` (UNAUTHENTICATED otherwise, with the GCS's own words)."""
    import grpc

    from raytrain_ft.jobs import GCS_PROBE_METHOD

    def get_cluster_id(request, context):
        if (
            token is not None
            and dict(context.invocation_metadata()).get("authorization") != f"Bearer {token}"
        ):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "InvalidAuthToken: Authentication token is missing or incorrect",
            )
        return b""

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            if details.method != GCS_PROBE_METHOD:
                return None
            return grpc.unary_unary_rpc_method_handler(
                get_cluster_id, request_deserializer=lambda b: b, response_serializer=lambda b: b
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((Handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)

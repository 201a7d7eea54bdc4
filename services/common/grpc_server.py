"""What every AFD gRPC server shares: a thread pool, the standard health service, one error
interceptor, and binding to host:port.

The interceptor is the one place where exceptions become status codes, so servicers stay
thin (convert, call the domain, convert back): ValueError -> INVALID_ARGUMENT, the exception
types a service names (its refusals) -> their codes, anything else -> INTERNAL with the
traceback logged. Knows nothing of any particular service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.cluster_secret import RequireSecret

log = logging.getLogger(__name__)

# Enough for every member of a large cluster to hold a long-poll at once.
DEFAULT_MAX_WORKERS = 64

ErrorCodes = Mapping[type[BaseException], grpc.StatusCode]


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns an exception escaping a handler (unary or server-streaming) into a status code
    and a clear message."""

    def __init__(self, codes: ErrorCodes) -> None:
        self._codes: dict[type[BaseException], grpc.StatusCode] = {
            ValueError: grpc.StatusCode.INVALID_ARGUMENT,
            **codes,
        }

    def code_for(self, err: BaseException) -> grpc.StatusCode:
        # The most specific class wins, whatever order the mapping lists them in.
        for cls in type(err).__mro__:
            if cls in self._codes:
                return self._codes[cls]
        return grpc.StatusCode.INTERNAL

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guard_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        stream = handler.unary_stream
        # The health service's Watch marks itself non-blocking; wrapping would lose that.
        if stream is not None and not getattr(stream, "experimental_non_blocking", False):
            return grpc.unary_stream_rpc_method_handler(
                self._guard_stream(stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client streams: none in this project yet

    def _guard_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(request, context)
            except Exception as err:
                self._abort(err, context, method)

        return guarded

    def _guard_stream(
        self, behavior: Callable[..., Iterator[Any]], method: str
    ) -> Callable[..., Iterator[Any]]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except Exception as err:
                self._abort(err, context, method)

        return guarded

    def _abort(self, err: Exception, context: grpc.ServicerContext, method: str) -> None:
        if context.code() not in (None, grpc.StatusCode.OK):
            raise err  # the handler aborted with its own code
        code = self.code_for(err)
        message = str(err) or type(err).__name__
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed", method, exc_info=err)
            message = f"{method} failed: {type(err).__name__}: {message}"
        else:
            # A refusal is the caller's problem, but whoever runs the server wants to see it
            # too (a member started with the wrong checkpoint, say).
            log.info("%s: %s: %s", method, code.name, message)
        context.abort(code, message)


class GrpcServer:
    """A grpc.Server with the error interceptor and the grpc.health.v1 Health service.

    The caller adds its own servicers to `.server`, binds, starts, and marks them serving.
    """

    def __init__(
        self,
        codes: ErrorCodes | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
        secret: str | None = None,
    ) -> None:
        """`secret`: refuse every call but health checks that does not carry it."""
        guard = [RequireSecret(secret)] if secret is not None else []
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            interceptors=[*guard, ErrorInterceptor(codes or {})],
            # Without this, a second server on an explicit port would bind it too and share it.
            options=[("grpc.so_reuseport", 0)],
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def bind(self, host: str, port: int) -> int:
        """Listen on host:port (port 0 picks a free one); returns the bound port."""
        target = (
            f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        )
        try:
            bound = self.server.add_insecure_port(target)
        except RuntimeError as err:
            raise OSError(f"cannot listen on {target}: {err}") from err
        if bound == 0:
            raise OSError(f"cannot listen on {target}: the address is taken or not local")
        return bound

    def start(self) -> None:
        self.server.start()

    def set_serving(self, serving: bool, services: Iterable[str] = ("",)) -> None:
        """Health status of each named service ("" is the whole server)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in services:
            self.health.set(service, status)

    def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, let running calls finish for up to grace_s, then stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()

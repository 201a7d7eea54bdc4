"""The attention instance's gRPC servicer for the gateway: messages in, a driver call,
messages out. Nothing else.

The shared error interceptor (services/common/grpc_server.py) maps exceptions of unary calls
only; Generate streams, so it maps its own with the same table.
"""

from __future__ import annotations

import grpc

from services.attention.driver import (
    DriverStopped,
    DuplicateRequestError,
    EngineDriver,
    EngineFailed,
)
from services.attention.session import Session
from services.common.grpc_server import ErrorInterceptor
from services.common.wire import attention as wire

# The interceptor's table, beside its ValueError -> INVALID_ARGUMENT (RequestError is one).
ERROR_CODES = {
    DuplicateRequestError: grpc.StatusCode.ALREADY_EXISTS,
    DriverStopped: grpc.StatusCode.UNAVAILABLE,
    EngineFailed: grpc.StatusCode.INTERNAL,
}


class AttentionServicer(wire.AttentionServiceServicer):
    """Method names and signatures are the generated base class's."""

    def __init__(self, driver: EngineDriver) -> None:
        self._driver = driver
        self._errors = ErrorInterceptor(ERROR_CODES)

    def Generate(self, request, context):
        try:
            params = wire.params_from_proto(request.params)
            stream = self._driver.submit(request.request_id, list(request.prompt_token_ids), params)
            # Runs when the RPC ends however it ends; a client that went away frees its blocks.
            if not context.add_callback(stream.cancel):
                stream.cancel()
            for output in stream:
                yield wire.output_to_proto(output)
        except (ValueError, RuntimeError) as err:
            context.abort(self._errors.code_for(err), str(err))

    def Session(self, request_iterator, context):
        yield from Session(self._driver, self._errors).serve(request_iterator, context)

    def Cancel(self, request, context):
        self._driver.cancel(request.request_id)
        return wire.cancel_response()

    def GetLoad(self, request, context):
        return wire.load_to_proto(self._driver.load())


def add_attention_service(server: grpc.Server, driver: EngineDriver) -> None:
    wire.add_attention_service_to_server(AttentionServicer(driver), server)

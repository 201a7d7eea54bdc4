"""The error interceptor: domain exceptions become gRPC status codes, the most specific class
first, for unary and streaming handlers alike."""

import grpc
import pytest

from services.common.grpc_server import ErrorInterceptor, GrpcServer
from services.controller.errors import Conflict, Refused, ShuttingDown

# ---- the error interceptor --------------------------------------------------------------


def test_the_most_specific_exception_class_picks_the_status_code():
    # The base class first: the order of the table must not matter.
    interceptor = ErrorInterceptor(
        {
            Refused: grpc.StatusCode.FAILED_PRECONDITION,
            Conflict: grpc.StatusCode.ALREADY_EXISTS,
            ShuttingDown: grpc.StatusCode.ABORTED,
        }
    )
    assert interceptor.code_for(Conflict("x")) is grpc.StatusCode.ALREADY_EXISTS
    assert interceptor.code_for(Refused("x")) is grpc.StatusCode.FAILED_PRECONDITION
    assert interceptor.code_for(ShuttingDown()) is grpc.StatusCode.ABORTED
    assert interceptor.code_for(ValueError("x")) is grpc.StatusCode.INVALID_ARGUMENT
    assert interceptor.code_for(KeyError("x")) is grpc.StatusCode.INTERNAL


def test_the_interceptor_maps_exceptions_of_unary_and_streaming_handlers(caplog):
    def unary(request, context):
        raise Conflict("taken")

    def stream(request, context):
        yield b"one"
        raise ValueError("bad second item")

    def broken(request, context):
        raise KeyError("oops")

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Broken": grpc.unary_unary_rpc_method_handler(broken),
    }
    server = GrpcServer({Refused: grpc.StatusCode.FAILED_PRECONDITION}, max_workers=2)
    server.server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Service", handlers)]
    )
    port = server.bind("127.0.0.1", 0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary("/test.Service/Unary")(b"", timeout=5)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == "taken"

            responses = channel.unary_stream("/test.Service/Stream")(b"", timeout=5)
            assert next(responses) == b"one"
            with pytest.raises(grpc.RpcError) as err:
                next(responses)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "bad second item"

            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary("/test.Service/Broken")(b"", timeout=5)
            assert err.value.code() is grpc.StatusCode.INTERNAL
            assert err.value.details() == "/test.Service/Broken failed: KeyError: 'oops'"
            assert "Broken failed" in caplog.text
    finally:
        server.stop(0)

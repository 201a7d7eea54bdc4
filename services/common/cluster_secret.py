"""The cluster secret: what a process must hold to join an AFD cluster.

Every control-plane call, and every call to an attention instance's API, carries it as gRPC
metadata, and the server refuses a call without it (UNAUTHENTICATED, compared in constant
time), so a stranger can neither register, take a rank, read a step plan, nor send requests
to an attention instance past the gateway's API keys. The data plane's rendezvous keys live
under a prefix derived from it, so a process without it cannot find, let alone take, a
place in an epoch's torch.distributed group, and never receives activations. Health checks
stay open: probes carry no secret.

Where it comes from: `--cluster-secret-file F` (first line), else the `AFD_CLUSTER_SECRET`
environment variable; a cluster started without either runs open, as before. `afd serve`
makes a fresh one for every local cluster and hands it to its processes in the environment.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import grpc

ENV = "AFD_CLUSTER_SECRET"
METADATA_KEY = "x-afd-cluster-secret"
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # probes: Kubernetes sends no metadata


def add_argument(parser) -> None:
    parser.add_argument(
        "--cluster-secret-file",
        metavar="F",
        help=f"the cluster's shared secret, first line of F (default: ${ENV}; none: open)",
    )


def load(path: str | None) -> str | None:
    """The secret from `path`, else from the environment, else None (an open cluster)."""
    if path:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise ValueError(f"--cluster-secret-file {path}: {err.strerror}") from err
        secret = lines[0].strip() if lines else ""
        if not secret:
            raise ValueError(f"--cluster-secret-file {path} is empty: put the secret on line 1")
        return secret
    return os.environ.get(ENV) or None


def new_secret() -> str:
    return secrets.token_hex(32)


def rendezvous_prefix(epoch: int, secret: str | None) -> str:
    """The data-plane store's key prefix for `epoch`: unguessable without the secret."""
    if secret is None:
        return f"epoch-{epoch}"
    tag = hmac.new(secret.encode(), f"epoch-{epoch}".encode(), hashlib.sha256).hexdigest()
    return f"epoch-{epoch}-{tag[:32]}"


REFUSAL = (
    "this cluster requires its secret: start the process with --cluster-secret-file or "
    f"${ENV} set to the cluster's secret"
)
# A refusal must have the shape of the method it stands in for (streaming or not).
_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _refuse(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


class RequireSecret(grpc.ServerInterceptor):
    """Refuses every call but health checks unless it carries the cluster secret."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        sent = dict(details.invocation_metadata or ()).get(METADATA_KEY, "")
        if isinstance(sent, str) and hmac.compare_digest(sent.encode(), self._secret):
            return handler
        make = _HANDLERS[(handler.request_streaming, handler.response_streaming)]
        return make(
            _refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def metadata(secret: str | None) -> tuple[tuple[str, str], ...]:
    """What a client sends with each call of a cluster that has `secret`."""
    return () if secret is None else ((METADATA_KEY, secret),)


class SendSecret(grpc.UnaryUnaryClientInterceptor):
    """Adds the secret to every unary call of a channel (the control plane's calls)."""

    def __init__(self, secret: str) -> None:
        self._metadata = (METADATA_KEY, secret)

    def intercept_unary_unary(self, continuation, details, request):
        metadata = (*(details.metadata or ()), self._metadata)
        return continuation(details._replace(metadata=metadata), request)

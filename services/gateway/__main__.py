"""`afd gateway --model DIR (--attention HOST:PORT ... | --controller HOST:PORT)`: the
OpenAI-compatible REST API.

Tokenises with the checkpoint's tokenizer and chat template, routes each request to the
attention instance with the most room, and streams the tokens back. Prints
`gateway serving on http://HOST:PORT` once it accepts connections (`--port 0` picks a free
port). Never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path

import uvicorn

from services.common import cluster_secret
from services.common.config import load_config
from services.common.tokenizer import Tokenizer
from services.gateway.admission import LimitConfig
from services.gateway.app import Gateway, GatewayConfig, create_app
from services.gateway.discovery import MembershipWatch
from services.gateway.router import Router

log = logging.getLogger("services.gateway")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="the checkpoint folder")
    parser.add_argument("--served-model-name", help="the API's model name (default: DIR's name)")
    parser.add_argument(
        "--attention",
        action="append",
        metavar="HOST:PORT",
        help="an attention instance's gRPC address (repeat for each); without it, the "
        "cluster's attention instances are found through --controller",
    )
    parser.add_argument(
        "--controller",
        metavar="HOST:PORT",
        help="the control plane: checked by /ready, and where the attention instances are "
        "found when --attention is not given",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1")
    parser.add_argument("--api-key-file", metavar="F", help="accepted keys, one per line")
    parser.add_argument("--tpot-sla-ms", type=float, default=50.0)
    parser.add_argument(
        "--max-running",
        type=int,
        default=256,
        help="most requests one attention instance runs at once (the adaptive cap's ceiling)",
    )
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, how long requests in flight may take to finish",
    )
    parser.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a jinja chat template to use instead of the checkpoint's (as transformers "
        "renders it: tools, chat_template_kwargs, tojson, strftime_now)",
    )
    parser.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        default="step3",
        help="step3: the thinking section (up to </think>) comes back as reasoning_content; "
        "none: all of the output is content (default step3)",
    )
    cluster_secret.add_argument(parser)
    parser.set_defaults(run=run)


REASONING_PARSERS = ("step3", "none")


def api_keys(args: argparse.Namespace) -> frozenset[str]:
    keys = {args.api_key} if args.api_key else set()
    if args.api_key_file:
        text = Path(args.api_key_file).read_text(encoding="utf-8")
        keys |= {line.strip() for line in text.splitlines() if line.strip()}
    return frozenset(keys)


def build_gateway(args: argparse.Namespace) -> Gateway:
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be at least 0, got {args.max_queue}")
    if args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes must be positive, got {args.max_body_bytes}")
    model_config = load_config(args.model)
    config = GatewayConfig(
        served_model_name=args.served_model_name or Path(args.model).resolve().name,
        max_context_tokens=model_config.max_position_embedding,
        api_keys=api_keys(args),
        max_body_bytes=args.max_body_bytes,
        controller=args.controller,
        reasoning_parser=args.reasoning_parser != "none",
    )
    if args.max_running < 1:
        raise ValueError(f"--max-running must be at least 1, got {args.max_running}")
    limits = LimitConfig(
        tpot_sla_s=args.tpot_sla_ms / 1000.0,
        initial=min(LimitConfig.initial, args.max_running),
        maximum=args.max_running,
    )
    secret = cluster_secret.load(args.cluster_secret_file)
    if not args.attention and not args.controller:
        raise ValueError(
            "name the attention instances (--attention HOST:PORT, repeated) or the controller "
            "to find them through (--controller HOST:PORT)"
        )
    router = Router(args.attention or [], limits, args.max_queue, secret=secret)
    # Without a fixed list, the attention instances are the cluster's: found and followed
    # through the controller as the cluster is scaled or re-forms.
    discovery = None if args.attention else MembershipWatch(args.controller, router, secret)
    template = None
    if args.chat_template:
        template = Path(args.chat_template).read_text(encoding="utf-8")
    tokenizer = Tokenizer.from_dir(args.model, chat_template=template)
    return Gateway(config, tokenizer, router, discovery=discovery)


async def serve(gateway: Gateway, host: str, port: int, drain_s: float = 30.0) -> None:
    listener = socket.create_server((host, port), family=_family(host))
    bound_port = listener.getsockname()[1]
    server = uvicorn.Server(
        # On SIGTERM uvicorn stops accepting and lets requests in flight finish (a drain).
        uvicorn.Config(create_app(gateway), log_level="warning", timeout_graceful_shutdown=drain_s)
    )
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        shown = f"[{host}]" if ":" in host else host
        print(f"gateway serving on http://{shown}:{bound_port}", flush=True)
    await task


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def run(args: argparse.Namespace) -> int:
    try:
        gateway = build_gateway(args)
    except (OSError, ValueError) as err:
        print(f"afd gateway: error: {err}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(gateway, args.host, args.port, args.drain_timeout))
    except OSError as err:
        print(
            f"afd gateway: error: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afd gateway", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

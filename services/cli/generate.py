"""`afd generate --model DIR --prompt TEXT`: one completion from the single-process engine."""

from __future__ import annotations

import argparse
import sys
import time

from services.common.completion import Completions
from services.common.config import load_config
from services.common.sampling_params import SamplingParams
from services.common.tokenizer import Tokenizer


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate",
        help="generate a completion on this machine",
        description="Load a checkpoint and stream one completion to stdout. The prompt is sent "
        "as a user message through the chat template unless --raw is given.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--raw", action="store_true", help="complete the text as is, no template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, ...")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(run=run)


def check_device(device: str) -> None:
    import torch  # here, not at the top: every `afd` command imports this module

    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1)") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: this machine has no usable CUDA GPU; use --device cpu"
        )


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    load_config(args.model)  # a folder that is not a checkpoint says so before the tokenizer
    check_device(args.device)
    tokenizer = Tokenizer.from_dir(args.model)
    if args.raw:
        prompt = tokenizer.encode(args.prompt, add_special_tokens=True)
    else:
        prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    # The engine and the model load torch: imported only when a completion is generated.
    from services.attention.builder import local_engine
    from services.attention.engine import EngineConfig
    from services.common.model.build import load_model

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    engine = local_engine(model, EngineConfig(), tokenizer)
    results = Completions(tokenizer)  # the text, as a client reads it from the engine's tokens
    results.add_request("generate", prompt, params)
    engine.add_request("generate", prompt, params)

    started = time.perf_counter()
    first_token_at = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            first_token_at = first_token_at or time.perf_counter()
            delta = results.add(output)
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            if delta.finished and not output.finished:
                engine.abort_request(output.request_id)  # a stop string matched
    elapsed = time.perf_counter() - started
    sys.stdout.write("\n")
    result = results["generate"]
    num = len(result.token_ids)
    decode_rate = (num - 1) / (time.perf_counter() - first_token_at) if num > 1 else 0.0
    print(
        f"[{len(prompt)} prompt tokens, {num} generated, finish: {result.finish_reason}, "
        f"{elapsed:.2f} s, {decode_rate:.1f} tokens/s decode]",
        file=sys.stderr,
    )
    return 0

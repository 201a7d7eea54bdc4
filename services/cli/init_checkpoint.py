"""`afd init-checkpoint DIR --preset tiny|step3`: a random-weight checkpoint in the real format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.common.presets import PRESETS, preset_config
from services.common.tokenizer_files import write_tokenizer_files


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "init-checkpoint",
        help="write a random-weight checkpoint in Step-3's format",
        description="Write config.json, safetensors weights, the DeepSeek-V3 tokenizer and a "
        "chat template into DIR. The step3 preset writes weights only with --weights, since "
        "every layer is several GB.",
    )
    parser.add_argument("dir", type=Path)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="layer count (step3 preset only)")
    parser.add_argument("--dtype", default="auto", help="weights dtype (default: the preset's)")
    parser.add_argument("--fp8", action="store_true", help="write block-FP8 weights with scales")
    parser.add_argument(
        "--weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the weights (default: yes for tiny, no for step3)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Writing weights takes torch: imported only when this command runs.
    from services.common.model.build import resolve_dtype
    from services.common.model.checkpoint_writer import (
        fp8_quantization_config,
        write_random_weights,
    )

    cfg = preset_config(args.preset, args.layers)
    write_weights = args.weights if args.weights is not None else args.preset == "tiny"
    args.dir.mkdir(parents=True, exist_ok=True)
    config = cfg.to_vl_config()
    if args.fp8:
        config["quantization_config"] = fp8_quantization_config()
    (args.dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids)}
    (args.dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer_files(args.dir, model_max_length=cfg.max_position_embedding)
    if write_weights:
        write_random_weights(
            args.dir, cfg, dtype=resolve_dtype(args.dtype, cfg), seed=args.seed, fp8=args.fp8
        )
    print(
        f"wrote a {args.preset} checkpoint to {args.dir}"
        + ("" if write_weights else " (no weights)")
    )
    return 0

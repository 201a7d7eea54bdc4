"""Text <-> token ids, and chat messages -> prompt, for a checkpoint folder.

`Tokenizer.from_dir` reads the folder's Hugging Face files: `tokenizer.json` (run by the
`tokenizers` library) and `tokenizer_config.json` (BOS/EOS, `add_bos_token`, the jinja chat
template, rendered in a sandbox the way transformers renders it: its `tojson` (no key sorting,
no HTML escaping, non-ASCII kept), `strftime_now` and `raise_exception`, with `tools` and the
request's `chat_template_kwargs` as variables).

This module deliberately knows nothing of torch, the model, sampling or HTTP: the gateway imports
it and must stay torch-free. It does not know which model the vocabulary belongs to either; all
of that comes from the files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from services.common.detokenizer import FastIncrementalDetokenizer

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers save the template instead


class TokenizerError(ValueError):
    """The tokenizer files are missing or unusable, or a request cannot be rendered."""


class Tokenizer:
    """One checkpoint's tokenizer: encode, decode and the chat template."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        source: str = "<memory>",
    ) -> None:
        self._tokenizer = tokenizer
        self._source = source
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._bos_token_id = self._token_id(bos_token, "bos_token")
        self._eos_token_id = self._token_id(eos_token, "eos_token")
        self._add_bos_token = add_bos_token
        self._template = None if chat_template is None else _compile(chat_template, source)
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        special.update(i for i in (self._bos_token_id, self._eos_token_id) if i is not None)
        self._all_special_ids = sorted(special)

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path, chat_template: str | None = None) -> Tokenizer:
        """Read `tokenizer.json` and, when present, `tokenizer_config.json` from a folder.
        `chat_template`: jinja text that replaces the folder's template."""
        folder = Path(checkpoint_dir)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(
                f"no {TOKENIZER_FILE} in {folder}: copy {TOKENIZER_FILE} and {CONFIG_FILE} from "
                f"the model's release into it, or create them with "
                f"services.common.tokenizer_files.write_tokenizer_files"
            )
        # The config first: its mistakes are cheaper to find than loading the vocabulary.
        config = _read_config(folder / CONFIG_FILE)
        template = chat_template if chat_template is not None else _chat_template(config, folder)
        bos_token = _token_content(config.get("bos_token"), "bos_token", folder)
        eos_token = _token_content(config.get("eos_token"), "eos_token", folder)
        try:
            tokenizer = _HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for any bad file
            raise TokenizerError(f"{path} is not a tokenizers file: {err}") from err
        return cls(
            tokenizer,
            bos_token=bos_token,
            eos_token=eos_token,
            add_bos_token=bool(config.get("add_bos_token", False)),
            chat_template=template,
            source=str(folder),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (ids are 0..vocab_size-1)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def all_special_ids(self) -> list[int]:
        """Ids `decode(..., skip_special_tokens=True)` drops, plus BOS and EOS; sorted."""
        return list(self._all_special_ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their single ids."""
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        # The check keeps a post-processor that already adds BOS from doubling it.
        if (
            add_special_tokens
            and self._add_bos_token
            and self._bos_token_id is not None
            and (not ids or ids[0] != self._bos_token_id)
        ):
            ids.insert(0, self._bos_token_id)
        return ids

    def backend_json(self) -> str:
        """The `tokenizers` JSON of this vocabulary (what grammar engines read)."""
        return self._tokenizer.to_str()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # Passed explicitly: the tokenizers library skips special tokens by default.
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(
        self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = False
    ) -> FastIncrementalDetokenizer:
        """A streaming decoder of the ids generated after `prompt_ids` (detokenizer.py)."""
        return FastIncrementalDetokenizer(self._tokenizer, prompt_ids, skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text for `messages` (each a dict with a string `role`, and `content` a
        string, a list of parts or None; an assistant's may hold `tool_calls`). `tools`: the
        request's, as OpenAI shapes them; `template_kwargs`: more variables for the template
        (a request's `chat_template_kwargs`, `enable_thinking` for instance), which may not
        replace the ones named here."""
        if self._template is None:
            raise TokenizerError(
                f"the tokenizer in {self._source} has no chat template: add `chat_template` to "
                f"its {CONFIG_FILE}, or send a plain-text prompt instead of chat messages"
            )
        _check_messages(messages)
        extra = dict(template_kwargs or {})
        reserved = sorted(RESERVED_TEMPLATE_VARIABLES & extra.keys())
        if reserved:
            raise TokenizerError(
                f"chat_template_kwargs may not set {', '.join(reserved)}: the request's own "
                "fields say them"
            )
        # As transformers: the special tokens, then the caller's variables over them.
        variables = {"bos_token": self._bos_token or "", "eos_token": self._eos_token or ""}
        variables |= extra
        try:
            return self._template.render(
                **variables,
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
            )
        except TokenizerError:
            raise
        except jinja2.TemplateError as err:
            raise TokenizerError(f"the chat template of {self._source} failed: {err}") from err

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Prompt ids for `messages` (as `apply_chat_template`); BOS comes from the template,
        never added twice."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, template_kwargs)
        return self.encode(text)

    def _token_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{field} {token!r} of {self._source} is not in the vocabulary")
        return token_id


def _read_config(path: Path) -> dict[str, Any]:
    # A folder with only tokenizer.json still encodes and decodes; it just has no chat template.
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def _token_content(value: Any, field: str, folder: Path) -> str | None:
    """A config token field as text: transformers writes either a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(
        f"{field} in {folder / CONFIG_FILE} must be a string or an AddedToken object with a "
        f"string 'content', got {value!r}"
    )


def _chat_template(config: dict[str, Any], folder: Path) -> str | None:
    template = config.get("chat_template")
    if template is None and (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    if isinstance(template, list):  # transformers' named templates; "default" serves chat
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise TokenizerError(
                f"chat_template in {folder / CONFIG_FILE} lists templates "
                f"{sorted(map(str, named))} but none named 'default'"
            )
    if template is not None and not isinstance(template, str):
        raise TokenizerError(
            f"chat_template in {folder / CONFIG_FILE} must be a string, "
            f"got {type(template).__name__}"
        )
    return template


def _raise_exception(message: str) -> NoReturn:
    raise TokenizerError(f"chat template: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: jinja's own sorts keys and escapes HTML, which templates
    written for transformers do not expect (a tool's JSON would read differently)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


# Variables a request's chat_template_kwargs may not replace.
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt"})


def _compile(template: str, source: str) -> jinja2.Template:
    # The settings transformers renders with, so that templates written for it render the same.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise TokenizerError(f"the chat template of {source} is not valid jinja: {err}") from err


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise TokenizerError(f"messages must be a list, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(
                f"messages[{index}] must be an object, got {type(message).__name__}"
            )
        if not isinstance(message.get("role"), str):
            raise TokenizerError(f"messages[{index}] has no string 'role'")
        if "content" not in message:
            raise TokenizerError(f"messages[{index}] has no 'content'")
        content = message["content"]
        if not (content is None or isinstance(content, str | list)):
            raise TokenizerError(
                f"messages[{index}].content must be a string, a list of parts or null, "
                f"got {type(content).__name__}"
            )

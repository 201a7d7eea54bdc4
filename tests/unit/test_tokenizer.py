"""The tokenizer layer on the real DeepSeek-V3 vocabulary: files, chat template, streaming."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.common.detokenizer import (
    MAX_PENDING_TOKENS,
    FastIncrementalDetokenizer,
    IncrementalDetokenizer,
    detokenizer_for,
)
from services.common.tokenizer import Tokenizer, TokenizerError
from services.common.tokenizer_files import CHAT_TEMPLATE, write_tokenizer_files

BOS, EOS_ID, USER_ID, ASSISTANT_ID, THINK_ID, NEWLINE_ID = 0, 128805, 128803, 128804, 128798, 201
FFFD = "\ufffd"

MIXED_TEXT = (
    "Hello, world! 你好，世界。Emoji: 😀🦄👨‍👩‍👧 naïve café\n"
    "def f(x):\n    return  x  *  2\t# tabs\tand   spaces\n\n"
)
# Rare CJK, astral-plane letters and emoji: byte-level BPE splits these inside a character.
HARD_TEXTS = [
    "𠀀𠀁 龘 鱻 ℵ 〄",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 🦄🦄 then 👨‍👩‍👧 done",
    "mixed 中文 text 😀 with emoji at the end 🦄",
    "ends mid-emoji-family 👩‍💻",
]
PLAIN_TEXTS = ["", " ", "plain ascii text", "  leading and trailing spaces  ", "a\n\n\tb"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint")
    write_tokenizer_files(folder, model_max_length=4096)
    return folder


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_dir(checkpoint)


def stream(detokenizer, ids: Sequence[int]) -> list[str]:
    return [detokenizer.add(token_id) for token_id in ids] + [detokenizer.flush()]


@pytest.fixture(params=["python", "tokenizers"])
def detokenizer(request: pytest.FixtureRequest, tokenizer: Tokenizer):
    """Makes a streaming detokenizer (prompt ids, skip_special_tokens): the Python one over
    `decode`, or the tokenizers library's DecodeStream (what the gateway runs)."""

    def make(prompt: Sequence[int] = (), skip_special_tokens: bool = False):
        if request.param == "python":
            return IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
        return tokenizer.detokenizer(prompt, skip_special_tokens)

    return make


def folder_with(tmp_path: Path, checkpoint: Path, config: dict | str | None) -> Path:
    """A checkpoint folder sharing the real tokenizer.json, with the given tokenizer_config."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tokenizer.json").symlink_to(checkpoint / "tokenizer.json")
    if isinstance(config, dict):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    elif isinstance(config, str):
        (tmp_path / "tokenizer_config.json").write_text(config)
    return tmp_path


# --- files and vocabulary -------------------------------------------------------------------


def test_written_config_is_hugging_face_format(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert config["eos_token"] == "<|EOT|>"
    assert config["add_bos_token"] is True
    assert config["model_max_length"] == 4096
    assert config["tokenizer_class"] == "LlamaTokenizerFast"
    assert config["chat_template"] == CHAT_TEMPLATE


def test_vocabulary_and_special_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 128815
    assert tokenizer.bos_token_id == BOS
    assert tokenizer.eos_token_id == EOS_ID
    special = tokenizer.all_special_ids
    assert {0, 1, EOS_ID} <= set(special)
    assert USER_ID not in special  # a role marker, not a special token: decode keeps it
    assert tokenizer.decode(special, skip_special_tokens=True) == ""
    assert tokenizer.decode([BOS, EOS_ID, USER_ID], skip_special_tokens=True) == "<｜User｜>"


def test_the_tokenizer_modules_do_not_import_torch() -> None:
    # The gateway imports these; a torch import here would drag torch into it.
    modules = ("tokenizer", "detokenizer", "tokenizer_files")
    code = "; ".join(f"import services.common.{name}" for name in modules)
    code += "; import sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- chat template --------------------------------------------------------------------------


CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]


def test_chat_template_renders_a_multi_turn_conversation(tokenizer: Tokenizer) -> None:
    assert tokenizer.apply_chat_template(CONVERSATION) == (
        "<｜begin▁of▁sentence｜> You are helpful. "
        "<|BOT|>user\n Hi <|EOT|><|BOT|>assistant\n Hello! How can I help? <|EOT|>"
        "<|BOT|>user\n Tell me a joke. <|EOT|><|BOT|>assistant\n<think>\n"
    )
    assert tokenizer.apply_chat_template(CONVERSATION[:3], add_generation_prompt=False) == (
        "<｜begin▁of▁sentence｜> You are helpful. "
        "<|BOT|>user\n Hi <|EOT|><|BOT|>assistant\n Hello! How can I help? <|EOT|>"
    )


def test_the_prompt_is_the_one_step3_s_released_template_renders(tokenizer: Tokenizer) -> None:
    # vLLM's Step-3 example hard-codes the prompt its released template makes.
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is this?"},
    ]
    assert tokenizer.apply_chat_template(messages) == (
        "<｜begin▁of▁sentence｜> You are a helpful assistant. <|BOT|>user\n What is this? "
        "<|EOT|><|BOT|>assistant\n<think>\n"
    )


def test_chat_template_joins_system_messages_and_allows_none(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "One."},
        {"role": "user", "content": "Q"},
        {"role": "system", "content": "Two."},
    ]
    prompt = tokenizer.apply_chat_template(messages)
    assert prompt == (
        "<｜begin▁of▁sentence｜> One.  Two. <|BOT|>user\n Q <|EOT|><|BOT|>assistant\n<think>\n"
    )
    user_only = [{"role": "user", "content": [{"type": "text", "text": "Q"}]}]
    assert tokenizer.apply_chat_template(user_only) == (
        "<｜begin▁of▁sentence｜><|BOT|>user\n Q <|EOT|><|BOT|>assistant\n<think>\n"
    )


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Wetter für eine Stadt <jetzt>",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_tools_calls_and_results_render_in_step3_s_format(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "n": 2}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tools=TOOLS)
    # As transformers' tojson writes it: keys in order, non-ASCII and < kept as they are.
    assert "<tools>" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in prompt
    assert prompt.startswith("<｜begin▁of▁sentence｜># Tools \nYou may call one or more tools")
    assert (
        "<|BOT|>assistant\n<｜tool_calls_begin｜>\n<｜tool_call_begin｜>function<｜tool_sep｜>"
        '<steptml:invoke name="get_weather"><steptml:parameter name="city">Paris'
        '</steptml:parameter><steptml:parameter name="n">2</steptml:parameter>'
        "</steptml:invoke><｜tool_call_end｜>\n<｜tool_calls_end｜><|EOT|>"
        "<|BOT|>tool_response\n sunny <|EOT|><|BOT|>assistant\n<think>\n"
    ) in prompt
    assert "# Tools" not in tokenizer.apply_chat_template(messages[:1])


def test_template_kwargs_reach_the_template_but_not_its_own_variables(
    tokenizer: Tokenizer,
) -> None:
    user = [{"role": "user", "content": "Q"}]
    assert tokenizer.apply_chat_template(user, template_kwargs={"enable_thinking": False}) == (
        "<｜begin▁of▁sentence｜><|BOT|>user\n Q <|EOT|><|BOT|>assistant\n<think>\n</think>\n"
    )
    with pytest.raises(TokenizerError, match="chat_template_kwargs may not set messages"):
        tokenizer.apply_chat_template(user, template_kwargs={"messages": []})


def test_a_template_given_instead_of_the_checkpoint_s(checkpoint: Path) -> None:
    template = "{{ bos_token }}{{ strftime_now('%Y') }}|{{ {'b': 1, 'a': 'é'} | tojson }}"
    tokenizer = Tokenizer.from_dir(checkpoint, chat_template=template)
    year = str(__import__("datetime").date.today().year)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Q"}])
    assert prompt == "<｜begin▁of▁sentence｜>" + year + '|{"b": 1, "a": "é"}'


def test_encode_chat_makes_role_markers_single_ids(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode_chat(CONVERSATION)
    assert ids[0] == BOS and ids.count(BOS) == 1  # BOS from the template, not added again
    assert ids.count(EOS_ID) == 3  # each turn's <|EOT|>
    assert ids[-2:] == [THINK_ID, NEWLINE_ID]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVERSATION)


# --- encode and decode ----------------------------------------------------------------------


def test_encode_decode_round_trip(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MIXED_TEXT)
    assert BOS not in ids
    assert tokenizer.decode(ids) == MIXED_TEXT
    for text in HARD_TEXTS + PLAIN_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_add_special_tokens_prepends_bos_once(tokenizer: Tokenizer) -> None:
    plain = tokenizer.encode("Hello world")
    assert tokenizer.encode("Hello world", add_special_tokens=True) == [BOS, *plain]
    assert tokenizer.encode("", add_special_tokens=True) == [BOS]


# --- streaming detokenisation ---------------------------------------------------------------


def test_the_streaming_tests_exercise_characters_split_across_tokens(
    tokenizer: Tokenizer,
) -> None:
    split = [i for t in HARD_TEXTS for i in tokenizer.encode(t) if FFFD in tokenizer.decode([i])]
    assert len(split) >= 10


@pytest.mark.parametrize("text", [MIXED_TEXT, *HARD_TEXTS, *PLAIN_TEXTS])
def test_stream_pieces_join_to_the_full_decode(tokenizer: Tokenizer, detokenizer, text) -> None:
    ids = tokenizer.encode(text)
    pieces = stream(detokenizer(), ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any(FFFD in piece for piece in pieces)


def test_stream_after_a_chat_prompt(tokenizer: Tokenizer, detokenizer) -> None:
    prompt = tokenizer.encode_chat(CONVERSATION)
    ids = tokenizer.encode(HARD_TEXTS[1]) + [EOS_ID]
    for skip in (False, True):
        pieces = stream(detokenizer(prompt, skip), ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)
        assert not any(FFFD in piece for piece in pieces)


def test_prompt_ending_mid_character_is_not_glued_to_the_output(
    tokenizer: Tokenizer, detokenizer
) -> None:
    emoji = tokenizer.encode("🦄")
    prompt, generated = emoji[:-1], tokenizer.encode(" and more")
    pieces = stream(detokenizer(prompt), generated)
    assert "".join(pieces) == " and more"


def test_flush_returns_a_truly_unfinished_character(tokenizer: Tokenizer, detokenizer) -> None:
    ids = tokenizer.encode("ok 🦄")[:-1]
    streaming = detokenizer()
    held = "".join(streaming.add(i) for i in ids)
    # The space shares a token with the emoji's first bytes: the Python detokenizer lets it
    # out, DecodeStream holds the whole token back.
    assert held in ("ok ", "ok")
    assert held + streaming.flush() == tokenizer.decode(ids)
    assert tokenizer.decode(ids).endswith(FFFD)


def test_a_long_run_of_incomplete_bytes_still_joins_to_the_decode(
    tokenizer: Tokenizer, detokenizer
) -> None:
    lead_byte = tokenizer.encode("😀")[0]  # an emoji's first bytes, never completed here
    text_ids = tokenizer.encode(HARD_TEXTS[2])
    for ids in ([lead_byte] * 100, [lead_byte] * 30 + text_ids, text_ids + [lead_byte] * 30):
        assert "".join(stream(detokenizer(), ids)) == tokenizer.decode(ids)


def test_the_tokenizer_streams_with_decode_stream_other_decoders_in_python(
    tokenizer: Tokenizer,
) -> None:
    assert isinstance(detokenizer_for(tokenizer, [1, 2]), FastIncrementalDetokenizer)
    recorder = WindowRecorder(tokenizer)  # a decoder with only `decode`
    assert isinstance(detokenizer_for(recorder, [1, 2]), IncrementalDetokenizer)


def fragment_ids(tokenizer: Tokenizer) -> list[int]:
    """Tokens holding part of a character, the ones random streams should be full of."""
    ids = {i for t in HARD_TEXTS for i in tokenizer.encode(t)}
    return sorted(i for i in ids if FFFD in tokenizer.decode([i]))


@pytest.mark.parametrize("seed", range(4))
def test_random_token_streams_join_to_the_full_decode(
    tokenizer: Tokenizer, detokenizer, seed: int
) -> None:
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    fragments = fragment_ids(tokenizer)
    for _ in range(50):
        ids = []
        while len(ids) < 40:
            # Half fragments, so that broken and completed byte sequences are common.
            token_id = (
                rng.choice(fragments) if rng.random() < 0.5 else rng.randrange(tokenizer.vocab_size)
            )
            if token_id not in special:
                ids.append(token_id)
        pieces = stream(detokenizer(), ids)
        assert "".join(pieces) == tokenizer.decode(ids)


def test_random_streams_with_special_tokens_skipped(tokenizer: Tokenizer, detokenizer) -> None:
    rng = random.Random(7)
    pool = fragment_ids(tokenizer) + tokenizer.all_special_ids[:20] + [USER_ID, EOS_ID]
    for _ in range(100):
        ids = [rng.choice(pool) for _ in range(30)]
        for skip in (False, True):
            pieces = stream(detokenizer((), skip), ids)
            assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)


class WindowRecorder:
    """A decoder that remembers the longest id list it was asked to decode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.longest = 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_window_stays_short_on_long_streams(tokenizer: Tokenizer) -> None:
    text_ids = tokenizer.encode(MIXED_TEXT * 20 + "".join(HARD_TEXTS) * 20)
    lead_byte = tokenizer.encode("😀")[0]  # an emoji's first bytes, never completed here
    assert tokenizer.decode([lead_byte] * 3) == FFFD * 3
    for ids in (text_ids, [lead_byte] * 500, ([lead_byte] * 30 + text_ids[:30]) * 10):
        recorder = WindowRecorder(tokenizer)
        pieces = stream(IncrementalDetokenizer(recorder), ids)
        assert "".join(pieces) == tokenizer.decode(ids)
        assert recorder.longest <= 2 * (MAX_PENDING_TOKENS + 2)


# --- errors ---------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json in .*write_tokenizer_files"):
        Tokenizer.from_dir(tmp_path)


def test_unreadable_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json is not a tokenizers file"):
        Tokenizer.from_dir(tmp_path)


def test_no_chat_template(tmp_path: Path, checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_dir(folder_with(tmp_path, checkpoint, None))
    assert tokenizer.decode(tokenizer.encode("still works")) == "still works"
    assert tokenizer.eos_token_id is None
    with pytest.raises(TokenizerError, match="has no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_added_token_dicts_and_unknown_tokens(tmp_path: Path, checkpoint: Path) -> None:
    added = {"__type": "AddedToken", "content": "<|EOT|>", "lstrip": False, "rstrip": False}
    good = folder_with(tmp_path / "good", checkpoint, {"eos_token": added})
    assert Tokenizer.from_dir(good).eos_token_id == EOS_ID
    bad = folder_with(tmp_path / "bad", checkpoint, {"bos_token": "<nope>"})
    with pytest.raises(TokenizerError, match="bos_token '<nope>' .* is not in the vocabulary"):
        Tokenizer.from_dir(bad)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "is not valid JSON"),
        ({"eos_token": 5}, "eos_token in .* must be a string or an AddedToken"),
        ({"chat_template": 3}, "chat_template in .* must be a string, got int"),
        ({"chat_template": "{% if %}"}, "chat template of .* is not valid jinja"),
    ],
)
def test_bad_tokenizer_config(
    tmp_path: Path, checkpoint: Path, config: dict | str, message: str
) -> None:
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_dir(folder_with(tmp_path, checkpoint, config))


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", r"messages must be a list, got str"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be an object, got str"),
        (
            [{"role": "user", "content": "a"}, {"content": "b"}],
            r"messages\[1\] has no string 'role'",
        ),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": 3}],
            r"messages\[1\]\.content must be a string, a list of parts or null, got int",
        ),
        ([{"role": 1, "content": "a"}], r"messages\[0\] has no string 'role'"),
        (
            [{"role": "user", "content": "a"}, {"role": "critic", "content": "b"}],
            r'messages\[1\] has role "critic"; this chat template knows system, user, '
            r"assistant and tool",
        ),
    ],
)
def test_malformed_messages(tokenizer: Tokenizer, messages: object, message: str) -> None:
    with pytest.raises(TokenizerError, match=message):
        tokenizer.encode_chat(messages)  # type: ignore[arg-type]

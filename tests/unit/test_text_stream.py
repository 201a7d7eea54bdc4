"""A request's text read from its engine outputs, on the real DeepSeek-V3 vocabulary: pieces
that join to the decode, stop strings found across tokens and never streamed in part, and
no text for the stop token that ended generation. The oracle is `Tokenizer.decode`."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.engine_output import EngineOutput
from services.common.sampling_params import SamplingParams
from services.common.text_stream import TextStream
from services.common.tokenizer import Tokenizer
from services.common.tokenizer_files import write_tokenizer_files

EOS_ID = 128805
FFFD = "\ufffd"
TEXT = "Hello, 世界! 𠀀𠀁 and 🦄🦄 then 👨‍👩‍👧 — the world is wide, wonderful and weird."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint")
    write_tokenizer_files(folder, model_max_length=4096)
    return Tokenizer.from_dir(folder)


def outputs(ids, finish_reason="length", stop_reason=None, per_output=1):
    """The engine's outputs for `ids`, `per_output` tokens each, the last one finished."""
    chunks = [tuple(ids[i : i + per_output]) for i in range(0, len(ids), per_output)]
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        yield EngineOutput(
            request_id="r",
            new_token_ids=chunk,
            new_logprobs=(),
            finished=last,
            finish_reason=finish_reason if last else None,
            stop_reason=stop_reason if last else None,
            num_prompt_tokens=3,
            num_cached_tokens=0,
        )


def read(stream: TextStream, engine_outputs) -> list:
    """Every delta until the stream says the request finished (a client stops reading)."""
    deltas = []
    for output in engine_outputs:
        deltas.append(stream.add(output))
        if deltas[-1].finished:
            break
    return deltas


def prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode("Say something:", add_special_tokens=True)


@pytest.mark.parametrize("per_output", [1, 3])
def test_pieces_join_to_the_decode_of_the_generated_ids(tokenizer, per_output):
    ids = tokenizer.encode(TEXT)
    stream = TextStream(tokenizer, prompt(tokenizer), SamplingParams())
    deltas = read(stream, outputs(ids, per_output=per_output))
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids) == TEXT
    assert not any(FFFD in d.text for d in deltas)  # never half a character
    assert (deltas[-1].finished, deltas[-1].finish_reason) == (True, "length")
    assert not any(d.finished for d in deltas[:-1])


def test_the_python_detokenizer_serves_a_decoder_without_a_stream(tokenizer):
    class OnlyDecode:  # like the API tests' WordDecoder: nothing but `decode`
        def decode(self, ids, skip_special_tokens=False):
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode(TEXT)
    stream = TextStream(OnlyDecode(), prompt(tokenizer), SamplingParams(stop=("weird",)))
    deltas = read(stream, outputs(ids))
    assert "".join(d.text for d in deltas) == TEXT[: TEXT.index("weird")]


def test_a_stop_string_across_tokens_ends_the_text_before_it(tokenizer):
    ids = tokenizer.encode(TEXT)
    stop = "🦄 then 👨"  # spans several tokens, and splits a character's bytes
    stream = TextStream(tokenizer, prompt(tokenizer), SamplingParams(stop=(stop,)))
    deltas = read(stream, outputs(ids))
    assert "".join(d.text for d in deltas) == TEXT[: TEXT.index(stop)]
    last = deltas[-1]
    assert (last.finished, last.finish_reason, last.stop_reason) == (True, "stop", stop)
    assert not last.output.finished  # the engine was still generating: the caller cancels it


def test_of_several_stop_strings_the_earliest_in_the_text_wins(tokenizer):
    ids = tokenizer.encode(TEXT)
    params = SamplingParams(stop=("weird", "wonder", "world", "nowhere"))
    deltas = read(TextStream(tokenizer, prompt(tokenizer), params), outputs(ids))
    assert "".join(d.text for d in deltas) == TEXT[: TEXT.index("world")]
    assert deltas[-1].stop_reason == "world"


def test_a_stop_string_is_never_streamed_in_part(tokenizer):
    # "wo" and "w" begin "wonderful" too: they are held back until the text says.
    ids = tokenizer.encode(TEXT)
    stop = "wonderful"
    deltas = read(TextStream(tokenizer, [], SamplingParams(stop=(stop,))), outputs(ids))
    final = TEXT[: TEXT.index(stop)]
    streamed = ""
    for k, delta in enumerate(deltas, 1):
        streamed += delta.text
        assert final.startswith(streamed)  # nothing streamed is ever taken back
        if not delta.finished:
            # Held back: what could begin the stop string, at most (and the rest of a token
            # that ends inside a character).
            generated = tokenizer.decode(ids[:k]).rstrip(FFFD)
            assert len(generated) - len(streamed) <= len(stop)
    assert streamed == final and final.endswith("wide, ")


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_the_eos_that_stopped_generation_shows_no_text(tokenizer, skip_special_tokens):
    ids = tokenizer.encode("hi there") + [EOS_ID]
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    deltas = read(TextStream(tokenizer, prompt(tokenizer), params), outputs(ids, "stop"))
    assert "".join(d.text for d in deltas) == "hi there"
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", None)
    # An EOS the request ignored (ignore_eos) is text like any token.
    ignored = read(TextStream(tokenizer, prompt(tokenizer), params), outputs(ids, "length"))
    shown = "hi there" + ("" if skip_special_tokens else "<|EOT|>")
    assert "".join(d.text for d in ignored) == shown


def test_the_stop_token_id_that_stopped_generation_shows_no_text(tokenizer):
    ids = tokenizer.encode("one two three")
    params = SamplingParams(stop_token_ids=(ids[-1],))
    deltas = read(TextStream(tokenizer, [], params), outputs(ids, "stop", ids[-1], per_output=2))
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids[:-1]) == "one two"
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", ids[-1])


def test_without_a_tokenizer_there_is_no_text_and_no_stop_string():
    ids = [5, 6, 7]
    deltas = read(TextStream(None, [1], SamplingParams()), outputs(ids))
    assert [d.text for d in deltas] == ["", "", ""] and deltas[-1].finish_reason == "length"
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        TextStream(None, [1], SamplingParams(stop=("x",)))

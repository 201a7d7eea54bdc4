"""What `afd bench` sends: prompt lengths counted by the real tokenizer, reproducible draws,
and clear errors for a bad length or a bad prompts file."""

from __future__ import annotations

import itertools

import pytest

from services.bench.workload import FilePrompts, Lengths, SyntheticPrompts, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)  # Step-3's vocabulary, as the server counts


def test_lengths_parse_fixed_and_ranges():
    assert Lengths.parse("128", "--input-len") == Lengths(128, 128)
    assert Lengths.parse("64:256", "--input-len") == Lengths(64, 256)
    for bad in ("0", "abc", "10:5", "-3", "1:x", ""):
        with pytest.raises(ValueError, match="--input-len"):
            Lengths.parse(bad, "--input-len")


def test_synthetic_prompts_have_exactly_the_drawn_number_of_tokens(tokenizer):
    source = SyntheticPrompts(tokenizer, Lengths(1, 300), Lengths(4, 9), seed=5)
    requests = list(itertools.islice(source, 60))
    for r in requests:
        assert len(tokenizer.encode(r.prompt)) == r.input_len
        assert 1 <= r.input_len <= 300 and 4 <= r.output_len <= 9
    assert len({r.input_len for r in requests}) > 20  # a spread, not one length
    assert len({r.prompt[:40] for r in requests}) == 60  # no shared prefixes to cache


def test_synthetic_prompts_are_reproducible_by_seed(tokenizer):
    def draw(seed):
        source = SyntheticPrompts(tokenizer, Lengths(16, 64), Lengths(8, 8), seed=seed)
        return [r.prompt for r in itertools.islice(source, 5)]

    assert draw(1) == draw(1) and draw(1) != draw(2)


def test_file_prompts_count_tokens_and_cycle(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello there", "max_tokens": 7}\n\n{"prompt": "Why?"}\n')
    requests = list(itertools.islice(FilePrompts(path, tokenizer, Lengths(32, 32)), 4))
    assert [r.output_len for r in requests] == [7, 32, 7, 32]
    assert requests[0].input_len == len(tokenizer.encode("Hello there"))


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json\n", r"prompts.jsonl:1: not JSON"),
        ('{"prompt": "a"}\n{"text": "b"}\n', r'prompts.jsonl:2: .*"prompt" string'),
        ('{"prompt": "a", "max_tokens": 0}\n', r'"max_tokens" must be a positive integer'),
        ("\n\n", r"no prompts"),
    ],
)
def test_a_bad_prompts_file_names_the_line_and_the_problem(tmp_path, tokenizer, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        FilePrompts(path, tokenizer, Lengths(8, 8))

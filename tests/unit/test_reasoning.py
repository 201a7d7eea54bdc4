"""Step-3's thinking told apart from its answer: the output starts inside the section the
prompt opened and turns into the answer at the first </think>; streamed in any chunking it
splits the same way."""

import pytest

from services.gateway.reasoning import ReasoningParser, opens_thinking, split_reasoning


def test_the_prompt_says_whether_the_output_starts_in_thinking():
    assert opens_thinking("<|BOT|>assistant\n<think>\n")
    assert not opens_thinking("<|BOT|>assistant\n<think>\n</think>\n")
    assert not opens_thinking("<|BOT|>assistant\n")


@pytest.mark.parametrize(
    ("thinking", "text", "expected"),
    [
        (True, "step 1, step 2\n</think>\n\nThe answer.", ("step 1, step 2\n", "The answer.")),
        (True, "still thinking when cut short", ("still thinking when cut short", "")),
        (True, "<think>opened again</think>ok", ("opened again", "ok")),
        (False, "  plain answer", ("", "plain answer")),
        (False, "<think>thinks anyway</think> answer", ("thinks anyway", "answer")),
        (False, "a < b </think> c", ("", "a < b </think> c")),  # no section was open
    ],
)
def test_whole_outputs_split(thinking, text, expected):
    assert split_reasoning(text, thinking) == expected


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_any_chunking_splits_the_same_way(size):
    text = "I consider </thin and </think>\n\nAnswer with </think> inside."
    parser, reasoning, content = ReasoningParser(thinking=True), "", ""
    for start in range(0, len(text), size):
        r, c = parser.feed(text[start : start + size])
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    assert (reasoning + r, content + c) == split_reasoning(text, True)
    assert (reasoning + r, content + c) == (
        "I consider </thin and ",
        "Answer with </think> inside.",
    )

"""Where a step's feed-forward runs, as the runner sees it: an FFN executor.

The runner (model_runner.py) walks the attention half over a step's micro-batches; after each
layer it hands every micro-batch's FFN input to the executor (`dispatch`) and, before that
micro-batch's next layer, takes back the FFN output (`combine`). Two executors:

- `LocalFFN`: the FFN half in this process (the colocated baseline, `afd generate`); dispatch
  computes at once, so a whole decode step has no host wait and can be one CUDA graph;
- `RemoteFFN` (remote_ffn.py): the FFN instances, over the data plane (AFD).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from services.common.model.attention_half import FFNInput
from services.common.model.ffn_half import FFNHalf


class FFNExecutor(Protocol):
    capturable: bool  # whether a whole step may be captured in one CUDA graph

    def begin(self, tokens_per_slot: list[int]) -> None:
        """A step starts: its token count per micro-batch slot (0: the slot is unused)."""
        ...

    def dispatch(self, layer: int, slot: int, x: FFNInput) -> None:
        """Micro-batch `slot`'s FFN input of `layer`; the slot's earlier dispatches are sent."""
        ...

    def combine(self, slot: int) -> Tensor:
        """The FFN output [n, H] of micro-batch `slot`'s last dispatch (waits for it)."""
        ...

    def wait_sent(self, slot: int) -> None:
        """Until micro-batch `slot`'s earlier dispatches have left (its buffers are free)."""
        ...

    def end(self) -> None:
        """The step's last transfers are done."""
        ...


class LocalFFN:
    """The FFN half in this process: `dispatch` computes, `combine` returns the result."""

    capturable = True

    def __init__(self, ffn: FFNHalf) -> None:
        self.ffn = ffn
        self._outputs: dict[int, Tensor] = {}

    def begin(self, tokens_per_slot: list[int]) -> None:
        pass

    def dispatch(self, layer: int, slot: int, x: FFNInput) -> None:
        self._outputs[slot] = self.ffn(layer, x)

    def combine(self, slot: int) -> Tensor:
        return self._outputs.pop(slot)

    def wait_sent(self, slot: int) -> None:
        pass

    def end(self) -> None:
        self._outputs.clear()

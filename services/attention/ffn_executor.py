"""Where a step's feed-forward runs, as the runner sees it: an FFN executor.

The runner (model_runner.py) walks the attention half over a step's micro-batches. For each
micro-batch and layer the executor sees, in order:

    receive(slot)               host: wait until the slot's last FFN output is here
    wait_sent(slot)             host: wait until the slot's last FFN input has left
    output(layer - 1, slot, rows)  GPU: that FFN output [rows, H], added to the residual stream
    stage(layer, slot, input)   GPU:  this layer's FFN input, put where `send` takes it from
    send(layer, slot, rows)     host: hand it to the FFN

`output` and `stage` only queue GPU work on buffers that outlive the step, so the runner may
capture them, with the attention between them, in a CUDA graph (segment_graphs.py); `receive`,
`wait_sent` and `send` stay outside. Two executors:

- `LocalFFN`: the FFN half in this process (the colocated baseline, `afd generate`); `stage`
  computes at once and nothing waits, so a whole decode step can be one CUDA graph;
- `RemoteFFN` (remote_ffn.py): the FFN instances, over the data plane (AFD).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from services.common.model.attention_half import FFNInput
from services.common.model.ffn_half import FFNHalf


class FFNExecutor(Protocol):
    capturable: bool  # whether a whole step may be captured in one CUDA graph
    # Counts replacements of the buffers `stage` and `output` use (graphs captured over the
    # old ones must be captured again).
    generation: int

    def reserve(self, max_rows: int) -> None:
        """From now on `output` reads, and `stage` writes, buffers allocated once, of up to
        `max_rows` rows per slot: what graphs replayed one after another need."""
        ...

    def begin(self, tokens_per_slot: list[int]) -> None:
        """A step starts: its rows per micro-batch slot (0: the slot is unused)."""
        ...

    def stage(self, layer: int, slot: int, x: FFNInput) -> None:
        """Micro-batch `slot`'s FFN input of `layer` (the slot's last input has left)."""
        ...

    def send(self, layer: int, slot: int, rows: int) -> None:
        """Send the staged input, `rows` rows, and post the receive of its output."""
        ...

    def receive(self, slot: int) -> None:
        """Until the output of the slot's last send is here."""
        ...

    def output(self, layer: int, slot: int, rows: int) -> Tensor:
        """The FFN output [rows, H] of the slot's last send, of `layer` (received)."""
        ...

    def wait_sent(self, slot: int) -> None:
        """Until the slot's last input has left (its buffers are free)."""
        ...

    def end(self) -> None:
        """The step's last transfers are done."""
        ...


class LocalFFN:
    """The FFN half in this process: `stage` computes, `output` returns the result.

    Reserved (for segment graphs), a slot's outputs of up to `max_rows` rows live in two
    buffers, even and odd layers: a segment reads the layer before's output and stages its
    own, and with one buffer its eager run before a capture would leave its own output where
    the replay reads the one before. Which buffer serves depends only on (layer, rows), not on
    what Python last ran, since a replay runs no Python."""

    capturable = True
    generation = 0  # its buffers are never replaced

    def __init__(self, ffn: FFNHalf) -> None:
        self.ffn = ffn
        self._outputs: dict[int, Tensor] = {}  # unreserved or larger: slot -> output
        self._buffers: dict[tuple[int, int], Tensor] = {}  # (slot, layer % 2) -> [max_rows, H]
        self._max_rows = 0

    def reserve(self, max_rows: int) -> None:
        self._max_rows = max_rows

    def begin(self, tokens_per_slot: list[int]) -> None:
        pass

    def stage(self, layer: int, slot: int, x: FFNInput) -> None:
        out = self.ffn(layer, x)
        if out.shape[0] <= self._max_rows:
            key = (slot, layer % 2)
            if key not in self._buffers:  # the first staging is eager (a capture's warm-up)
                self._buffers[key] = out.new_empty(self._max_rows, out.shape[1])
            self._buffers[key][: out.shape[0]].copy_(out)
        else:
            self._outputs[slot] = out

    def send(self, layer: int, slot: int, rows: int) -> None:
        pass

    def receive(self, slot: int) -> None:
        pass

    def output(self, layer: int, slot: int, rows: int) -> Tensor:
        if rows <= self._max_rows:
            return self._buffers[(slot, layer % 2)][:rows]
        return self._outputs[slot]

    def wait_sent(self, slot: int) -> None:
        pass

    def end(self) -> None:
        self._outputs.clear()

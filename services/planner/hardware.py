"""Accelerators: price, peak FLOP/s, memory bandwidth and capacity, network per GPU.

The paper's four (H800, H20, A800, 910B) carry the paper's own prices and peaks (STEP3.md
section 3); the others carry their public datasheets' dense (not sparse) peaks and an assumed
hourly price, flagged as such. Any field of any accelerator can be overridden, and new ones
added, from a JSON file (`load_accelerators`), because prices move faster than code.

This module does not know what runs on the accelerator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

GBPS = 1e9 / 8  # bytes/s in one Gb/s


@dataclass(frozen=True)
class Accelerator:
    """One GPU (or NPU) and its share of its server's network.

    Units: USD per hour; FLOP/s; bytes/s; bytes. `fp8_flops` is None where the chip has no
    FP8 tensor cores, and then BF16 is its matmul peak (the paper's rule).
    """

    name: str
    price_per_hour: float
    bf16_flops: float
    fp8_flops: float | None
    memory_bandwidth: float
    memory_bytes: float
    network_gbps: float  # per GPU, one direction (its NIC)
    gpus_per_server: int = 8
    source: str = ""  # where the figures come from

    def __post_init__(self) -> None:
        for name in ("price_per_hour", "bf16_flops", "memory_bandwidth", "memory_bytes"):
            _require_positive(self.name, name, getattr(self, name))
        _require_positive(self.name, "network_gbps", self.network_gbps)
        if self.fp8_flops is not None:
            _require_positive(self.name, "fp8_flops", self.fp8_flops)
        if isinstance(self.gpus_per_server, bool) or not isinstance(self.gpus_per_server, int):
            raise ValueError(f"accelerator {self.name}: field 'gpus_per_server' must be an int")
        _require_positive(self.name, "gpus_per_server", self.gpus_per_server)

    @property
    def matmul_flops(self) -> float:
        """FLOP/s the cost model prices work at: FP8 where the chip has it, else BF16."""
        return self.fp8_flops if self.fp8_flops is not None else self.bf16_flops

    @property
    def network_bytes_per_s(self) -> float:
        """One GPU's NIC, one direction."""
        return self.network_gbps * GBPS

    @property
    def server_network_bytes_per_s(self) -> float:
        """All NICs of one server: the paper's 'Net' (8 x 400 Gb/s = 400 GB/s for H800)."""
        return self.network_bytes_per_s * self.gpus_per_server

    @property
    def usd_per_flop(self) -> float:
        """U_flop = price / 3600 / peak."""
        return self.price_per_hour / 3600 / self.matmul_flops

    @property
    def usd_per_byte(self) -> float:
        """U_byte = price / 3600 / memory bandwidth."""
        return self.price_per_hour / 3600 / self.memory_bandwidth


def _require_positive(accelerator: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(
            f"accelerator {accelerator}: field {name!r} must be positive, got {value!r}"
        )


PAPER = "Step-3 paper (STEP3.md section 3)"
ASSUMED_PRICE = "datasheet (dense peaks); price assumed, override with --hardware-file"

BUILT_IN = (
    # The paper's four: its prices, peaks and networks; capacities from the datasheets.
    Accelerator("H800", 2.0, 9.89e14, 1.98e15, 3.35e12, 80e9, 400, source=PAPER),
    Accelerator("H20", 0.8, 1.48e14, 2.96e14, 4.00e12, 96e9, 400, source=PAPER),
    Accelerator("A800", 0.75, 3.12e14, None, 2.00e12, 80e9, 200, source=PAPER),
    Accelerator("910B", 0.67, 2.80e14, None, 1.60e12, 64e9, 200, source=PAPER),
    # Datasheets: H100/H200 SXM, HGX B200 (180 GB, 8 TB/s), L20 and L40S (PCIe, GDDR6).
    Accelerator("H100", 2.5, 9.89e14, 1.979e15, 3.35e12, 80e9, 400, source=ASSUMED_PRICE),
    Accelerator("H200", 3.0, 9.89e14, 1.979e15, 4.8e12, 141e9, 400, source=ASSUMED_PRICE),
    Accelerator("B200", 5.0, 2.25e15, 4.5e15, 8.0e12, 180e9, 400, source=ASSUMED_PRICE),
    Accelerator("L20", 0.6, 1.195e14, 2.39e14, 8.64e11, 48e9, 200, source=ASSUMED_PRICE),
    Accelerator("L40S", 1.0, 3.62e14, 7.33e14, 8.64e11, 48e9, 200, source=ASSUMED_PRICE),
)
PAPER_ACCELERATORS = ("H800", "H20", "A800", "910B")


def built_in() -> dict[str, Accelerator]:
    return {a.name: a for a in BUILT_IN}


def load_accelerators(path: str | Path | None = None) -> dict[str, Accelerator]:
    """The built-in accelerators, with a JSON file's entries laid over them.

    The file maps names to objects of `Accelerator` fields: a known name may give only the
    fields it changes (`{"H200": {"price_per_hour": 2.2}}`); a new name must give them all.
    """
    accelerators = built_in()
    if path is None:
        return accelerators
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"hardware file {path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"hardware file {path} must hold an object of name -> fields")
    known = {f.name for f in fields(Accelerator)} - {"name"}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise ValueError(f"hardware file {path}: {name!r} must map to an object of fields")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(
                f"hardware file {path}: {name!r} has unknown fields {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        if name in accelerators:
            accelerators[name] = replace(accelerators[name], **entry)
            continue
        missing = sorted(f.name for f in fields(Accelerator) if f.name in known - set(entry))
        required = [m for m in missing if m not in ("gpus_per_server", "source")]
        if required:
            raise ValueError(
                f"hardware file {path}: new accelerator {name!r} is missing {', '.join(required)}"
            )
        accelerators[name] = Accelerator(name=name, **entry)
    return accelerators


def find_accelerator(name: str, accelerators: dict[str, Accelerator]) -> Accelerator:
    """Case-insensitive lookup; an unknown name lists the known ones."""
    for known, accelerator in accelerators.items():
        if known.lower() == name.strip().lower():
            return accelerator
    raise ValueError(
        f"unknown accelerator {name!r}; known: {', '.join(accelerators)} "
        "(add one with --hardware-file)"
    )

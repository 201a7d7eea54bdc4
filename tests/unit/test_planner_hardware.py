"""Accelerators: the paper's four as published, the datasheet ones, and overrides from a file."""

import json

import pytest

from services.planner.hardware import built_in, find_accelerator, load_accelerators


def test_every_accelerator_the_issue_names_is_built_in():
    names = {"H800", "H20", "A800", "910B", "H100", "H200", "B200", "L20", "L40S"}
    assert names <= set(built_in())


def test_chips_without_fp8_are_priced_at_their_bf16_peak():
    accelerators = built_in()
    assert accelerators["A800"].matmul_flops == 3.12e14
    assert accelerators["H800"].matmul_flops == 1.98e15
    assert accelerators["H800"].server_network_bytes_per_s == 400e9  # 8 x 400 Gb/s


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown accelerator 'V100'; known: H800, H20"):
        find_accelerator("V100", built_in())
    assert find_accelerator("h200", built_in()).name == "H200"


def test_a_file_overrides_fields_and_adds_accelerators(tmp_path):
    path = tmp_path / "hw.json"
    new = {
        "price_per_hour": 1.0,
        "bf16_flops": 1e15,
        "fp8_flops": None,
        "memory_bandwidth": 2e12,
        "memory_bytes": 64e9,
        "network_gbps": 200,
    }
    path.write_text(json.dumps({"H200": {"price_per_hour": 2.2}, "X1": new}))
    accelerators = load_accelerators(path)
    assert accelerators["H200"].price_per_hour == 2.2
    assert accelerators["H200"].memory_bandwidth == 4.8e12  # untouched fields stay
    assert accelerators["X1"].matmul_flops == 1e15


def test_a_new_accelerator_missing_fields_names_them(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"X1": {"price_per_hour": 1.0}}))
    with pytest.raises(ValueError, match="'X1' is missing bf16_flops, fp8_flops"):
        load_accelerators(path)


def test_unknown_and_invalid_fields_are_named(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"H200": {"price": 2.2}}))
    with pytest.raises(ValueError, match="unknown fields price"):
        load_accelerators(path)
    path.write_text(json.dumps({"H200": {"price_per_hour": -1}}))
    with pytest.raises(ValueError, match="'price_per_hour' must be positive"):
        load_accelerators(path)

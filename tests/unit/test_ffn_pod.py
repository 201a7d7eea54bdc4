"""`afd ffn-pod`'s command lines: process p of FFN instance F is FFN place F x G + p, on GPU p,
on ports of its own; every other flag reaches every process unchanged."""

import pytest

from services.cli import parse
from services.cli.ffn_pod import child_args


def test_each_process_gets_its_place_its_gpu_and_its_ports():
    args = parse([
        "ffn-pod", "--index", "1", "--processes", "4", "--device", "cuda", "--port", "50051",
        "--metrics-port", "9400", "--controller", "c:1", "--model", "/model", "--enforce-eager",
    ])  # fmt: skip
    assert child_args(args, 2) == [
        "ffn", "--index", "6", "--instance-size", "4", "--device", "cuda:2", "--port", "50053",
        "--metrics-port", "9402", "--controller", "c:1", "--model", "/model", "--enforce-eager",
    ]  # fmt: skip


def test_free_ports_stay_free_and_a_cpu_pod_runs_every_process_on_the_cpu():
    args = parse(["ffn-pod", "--index", "0", "--processes", "2", "--metrics-port", "0"])
    assert child_args(args, 1) == [
        "ffn", "--index", "1", "--instance-size", "2", "--device", "cpu", "--port", "0",
        "--metrics-port", "0",
    ]  # fmt: skip


def test_other_commands_still_refuse_flags_they_do_not_know(capsys):
    with pytest.raises(SystemExit):
        parse(["serve", "--model", "m", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err

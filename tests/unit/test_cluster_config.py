"""The cluster's facts: one frozen value, checked on construction with errors that name the
field, the flag and the value; the controller's and `afd serve`'s flags build it; a member
that sees it change is told what changed."""

import argparse

import pytest

from services.common import cluster_config
from services.common.cluster_config import ClusterConfig, ClusterConfigChanged


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_micro_batches": 0}, r"num_micro_batches \(--micro-batches\) must be 1 to 4, got 0"),
        ({"num_micro_batches": 5}, "must be 1 to 4, got 5"),
        ({"num_micro_batches": True}, "must be 1 to 4, got True"),
        ({"max_num_batched_tokens": 0}, r"\(--max-num-batched-tokens\) must be a positive .* 0"),
        ({"fp8_dispatch": "yes"}, "fp8_dispatch must be True or False, got 'yes'"),
        ({"ffn_layout": "sharded"}, "must be one of split, replicated, got 'sharded'"),
        ({"ffn_instance_size": 0}, r"\(--gpus-per-ffn-instance\) must be a positive .* 0"),
        (
            {"ffn_instance_size": 2, "ffn_layout": "replicated"},
            "--gpus-per-ffn-instance 2 takes --ffn-layout split",
        ),
    ],
)
def test_a_bad_fact_is_refused_by_name_and_value(fields, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig(**fields)


def parse(*argv: str) -> ClusterConfig:
    parser = argparse.ArgumentParser()
    cluster_config.add_arguments(parser)
    return ClusterConfig.from_args(parser.parse_args(argv))


def test_flags_build_it_and_those_not_given_take_the_defaults():
    assert parse() == ClusterConfig(3, 512, fp8_dispatch=False, ffn_layout="split")
    assert parse(
        "--micro-batches", "2", "--max-num-batched-tokens", "64", "--fp8-dispatch",
        "--ffn-layout", "replicated",
    ) == ClusterConfig(2, 64, fp8_dispatch=True, ffn_layout="replicated")  # fmt: skip
    assert parse("--gpus-per-ffn-instance", "4").ffn_instance_size == 4
    with pytest.raises(ValueError, match="got 9"):
        parse("--micro-batches", "9")


def test_a_changed_fact_is_named_with_both_values():
    built_for = ClusterConfig()
    built_for.check_unchanged(ClusterConfig())
    with pytest.raises(ClusterConfigChanged, match="max_num_batched_tokens from 512 to 64"):
        built_for.check_unchanged(ClusterConfig(max_num_batched_tokens=64))

"""Fixtures shared by the test tiers."""

from __future__ import annotations

import pytest
import torch

from services.common.model.step3 import Step3ForCausalLM
from tests.support.models import random_model, small_config


@pytest.fixture(scope="session")
def tiny_model_f64() -> Step3ForCausalLM:
    """float64, so batching and summation order can never flip a greedy choice."""
    return random_model(small_config(), torch.float64)

"""Fixtures of the distributed tests."""

from __future__ import annotations

import pytest

from tests.support.attention_api import serve


@pytest.fixture(scope="module")
def api(tiny_model_f64):
    served = serve(tiny_model_f64)
    yield served
    served.channel.close()
    served.server.stop(0)
    served.driver.stop()

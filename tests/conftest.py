import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

from embedlink import BootstrapServer

# Every property runs at least 200 examples, in CI and locally.
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# tests/vllm runs in its own environment (scripts/setup_vllm.sh builds it and
# scripts/test.sh runs it); elsewhere there is nothing to collect there.
# Likewise tests/sglang (scripts/setup_sglang.sh).
collect_ignore = [tier for tier in ("vllm", "sglang") if importlib.util.find_spec(tier) is None]


@pytest.fixture
def boot():
    """A real bootstrap server on a free loopback port."""
    with BootstrapServer(host="127.0.0.1", port=0) as b:
        yield b

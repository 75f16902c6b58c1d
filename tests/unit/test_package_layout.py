"""The layered layout (docs/architecture.md): old import paths of moved
modules give the moved modules themselves, and importing the library loads
none of the tools, test harnesses or services."""

import importlib
import subprocess
import sys

import pytest

OLD_PATHS = {
    "embedlink.encoder": "embedlink.endpoints.encoder",
    "embedlink.language": "embedlink.endpoints.language",
    "embedlink.cli": "embedlink.service.cli",
    "embedlink.standalone": "embedlink.service.standalone",
    "embedlink.bench": "embedlink.tools.bench",
    "embedlink.workers": "embedlink.tools.workers",
    "embedlink.sim": "embedlink.testing.sim",
    "embedlink.metrics": "embedlink.observability.metrics",
    "embedlink.logs": "embedlink.observability.logs",
    "embedlink.auth": "embedlink._runtime.auth",
    "embedlink.vllm_proxy": "embedlink.integrations.vllm_proxy",
    "embedlink.integrations.vllm_bench": "embedlink.tools.vllm_bench",
    "embedlink.integrations.sglang_bench": "embedlink.tools.sglang_bench",
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_an_old_import_path_is_the_moved_module(old):
    moved = importlib.import_module(OLD_PATHS[old])
    assert importlib.import_module(old) is moved
    parent, _, leaf = old.rpartition(".")
    assert getattr(importlib.import_module(parent), leaf) is moved
    # a name imported from either path is one object (monkeypatching one patches both)
    public = [n for n in vars(moved) if not n.startswith("_")]
    assert public
    assert all(getattr(importlib.import_module(old), n) is getattr(moved, n) for n in public)


def test_importing_the_library_loads_no_tool_harness_or_service():
    code = (
        "import sys, embedlink\n"
        "from embedlink import EncoderEndpoint, LanguageEndpoint, BootstrapServer\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] in "
        "(['embedlink', 'tools'], ['embedlink', 'testing'], ['embedlink', 'service']))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == ""

"""The protocol core imports only pure modules (an allow-list; import-linter
forbids the known I/O modules, this catches anything new)."""

import ast
import pathlib

import embedlink.protocol

ALLOWED = {
    "__future__",
    "collections",
    "dataclasses",
    "enum",
    "functools",
    "math",
    "re",
    "types",
    "typing",
    "numpy",
    "ml_dtypes",
    "msgspec",
}


def _outside_the_allow_list(name: str, source: str) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside protocol/
                assert node.level == 1, f"{name} reaches outside protocol/"
                continue
            names = [node.module or ""]
        else:
            continue
        bad += [f"{name}: {n}" for n in names if n.split(".")[0] not in ALLOWED]
    return bad


def test_protocol_imports_only_pure_modules():
    root = pathlib.Path(embedlink.protocol.__file__).parent
    paths = sorted(root.glob("*.py"))
    assert {p.name for p in paths} >= {"status.py", "rooms.py", "messages.py", "planner.py"}
    bad = []
    for path in paths:
        bad += _outside_the_allow_list(path.name, path.read_text())
    assert not bad, bad


def test_the_import_check_catches_io_imports():
    """The checker itself: every way of importing I/O is flagged, the pure
    modules are not (so the test above cannot pass vacuously)."""
    source = (
        "import socket\n"
        "import os.path\n"
        "from threading import Lock\n"
        "from embedlink import memory\n"
        "import numpy as np, time\n"
        "from .status import Status\n"
        "from collections.abc import Sequence\n"
    )
    assert _outside_the_allow_list("x.py", source) == [
        "x.py: socket",
        "x.py: os.path",
        "x.py: threading",
        "x.py: embedlink",
        "x.py: time",
    ]

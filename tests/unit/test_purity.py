"""The protocol core imports only pure modules (an allow-list; import-linter
forbids the known I/O modules, this catches anything new)."""

import ast
import pathlib
import sys

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


def test_protocol_imports_only_pure_modules():
    root = pathlib.Path(embedlink.protocol.__file__).parent
    bad = []
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside protocol/
                    assert node.level == 1, f"{path.name} reaches outside protocol/"
                    continue
                names = [node.module or ""]
            else:
                continue
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] not in ALLOWED]
    assert not bad, bad
    assert "socket" in sys.stdlib_module_names  # the allow-list is not vacuous

#!/usr/bin/env python3
"""Regenerate docs/protocol.md and docs/configuration.md from the code (tests fail when
they are stale)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from embedlink.tools.docs import render_configuration_md, render_protocol_md  # noqa: E402

(ROOT / "docs" / "protocol.md").write_text(render_protocol_md())
(ROOT / "docs" / "configuration.md").write_text(render_configuration_md())
print("wrote docs/protocol.md and docs/configuration.md")

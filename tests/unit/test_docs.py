import pathlib

from embedlink.config import SETTINGS
from embedlink.protocol import RECEIVER_INPUTS, SENDER_INPUTS, TRANSITIONS, Move
from embedlink.tools.docs import render_configuration_md, render_protocol_md

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
DOC = DOCS / "protocol.md"


def test_protocol_doc_is_generated_from_the_code_and_current():
    assert DOC.read_text() == render_protocol_md(), "run: python scripts/gen_docs.py"


def test_protocol_doc_draws_every_legal_move():
    text = render_protocol_md()
    for (a, b), move in TRANSITIONS.items():
        if move is Move.ADVANCE:
            assert f"{a.name} --> {b.name}" in text
    assert "Transferring --> WaitingForInput" not in text


def test_protocol_doc_lists_every_input_of_both_rooms_with_every_reason():
    text = render_protocol_md()
    for table in (SENDER_INPUTS, RECEIVER_INPUTS):
        for (_status, kind), rule in table.items():
            assert f"| `{kind.value}` |" in text and f"- `{kind.value}`: " in text
            assert rule.why in text


def test_configuration_doc_is_current_and_lists_every_setting():
    text = render_configuration_md()
    assert (DOCS / "configuration.md").read_text() == text, "run: python scripts/gen_docs.py"
    for s in SETTINGS:
        assert f"`{s.name}`" in text and s.env in text
        if s.sglang:
            assert s.sglang in text

import pathlib

from embedlink._docs import render_protocol_md
from embedlink.protocol import TRANSITIONS, Move

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_protocol_doc_is_generated_from_the_code_and_current():
    assert DOC.read_text() == render_protocol_md(), "run: python scripts/gen_docs.py"


def test_protocol_doc_draws_every_legal_move():
    text = render_protocol_md()
    for (a, b), move in TRANSITIONS.items():
        if move is Move.ADVANCE:
            assert f"{a.name} --> {b.name}" in text
    assert "Transferring --> WaitingForInput" not in text

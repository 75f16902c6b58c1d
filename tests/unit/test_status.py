import pytest

from embedlink import Status
from embedlink.protocol import TRANSITIONS, IllegalTransition, Move, check_transition, transition

S = Status


def test_status_values_are_the_seeds():
    assert [(s.name, s.value) for s in Status] == [
        ("Bootstrapping", 0),
        ("WaitingForInput", 1),
        ("Transferring", 2),
        ("Success", 3),
        ("Failed", 4),
    ]


# The whole table, written out by hand from the seed's rules (rows: from,
# columns: to, in status order), so the code's table is checked against an
# independent statement of the rules rather than against itself.
A, SM, BK, FT, SK = Move.ADVANCE, Move.SAME, Move.BACKWARD, Move.FROM_TERMINAL, Move.SKIP
EXPECTED = {
    S.Bootstrapping: [SM, A, SK, SK, A],
    S.WaitingForInput: [BK, SM, A, A, A],
    S.Transferring: [BK, BK, SM, A, A],
    S.Success: [FT, FT, FT, SM, FT],
    S.Failed: [FT, FT, FT, FT, SM],
}


def test_transition_table_is_the_seeds_rules():
    got = {a: [TRANSITIONS[(a, b)] for b in Status] for a in Status}
    assert got == EXPECTED
    assert set(TRANSITIONS) == {(a, b) for a in Status for b in Status}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (S.Bootstrapping, S.WaitingForInput),
        (S.WaitingForInput, S.Transferring),
        (S.WaitingForInput, S.Success),
        (S.Transferring, S.Success),
    ],
)
def test_status_seed_forward_moves_are_legal(a, b):
    assert check_transition(a, b) is Move.ADVANCE
    assert transition(a, b) is b


@pytest.mark.parametrize("a", [S.Bootstrapping, S.WaitingForInput, S.Transferring])
def test_status_failed_reachable_from_every_non_terminal_with_reason(a):
    assert transition(a, S.Failed, "peer died") is S.Failed
    with pytest.raises(IllegalTransition, match="reason"):
        transition(a, S.Failed)
    with pytest.raises(IllegalTransition):
        transition(a, S.Failed, "")


def test_status_rejects_resume_reset_to_waiting_for_input():
    # The seed's bug 1: a resume reset Transferring back to WaitingForInput.
    assert check_transition(S.Transferring, S.WaitingForInput) is Move.BACKWARD
    with pytest.raises(IllegalTransition, match="backward"):
        transition(S.Transferring, S.WaitingForInput)


@pytest.mark.parametrize("terminal", [S.Success, S.Failed])
@pytest.mark.parametrize("other", list(Status))
def test_status_terminal_never_left(terminal, other):
    if other is terminal:
        assert transition(terminal, other) is terminal
    else:
        assert check_transition(terminal, other) is Move.FROM_TERMINAL
        with pytest.raises(IllegalTransition):
            transition(terminal, other, "x")


@pytest.mark.parametrize("s", list(Status))
def test_status_same_is_a_noop(s):
    assert check_transition(s, s) is Move.SAME
    assert transition(s, s) is s


def test_status_skips_are_rejected():
    assert check_transition(S.Bootstrapping, S.Success) is Move.SKIP
    assert check_transition(S.Bootstrapping, S.Transferring) is Move.SKIP
    with pytest.raises(IllegalTransition, match="skip"):
        transition(S.Bootstrapping, S.Success)


def test_status_terminal_flag():
    assert {s for s in Status if s.is_terminal} == {S.Success, S.Failed}

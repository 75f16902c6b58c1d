from hypothesis import given
from hypothesis import strategies as st

from embedlink import Status
from embedlink.protocol import IllegalTransition, transition

S = Status
statuses = st.sampled_from(list(Status))

# An independent oracle, written from the seed's transition table.
SEED_TABLE = {
    (S.Bootstrapping, S.WaitingForInput),
    (S.WaitingForInput, S.Transferring),
    (S.WaitingForInput, S.Success),
    (S.Transferring, S.Success),
}


def legal(current, proposed, reason):
    if current is proposed:
        return True
    if current.is_terminal:
        return False
    if proposed is S.Failed:
        return bool(reason)
    return (current, proposed) in SEED_TABLE


@given(statuses, statuses, st.one_of(st.none(), st.text(max_size=5)))
def test_every_pair_moves_forward_or_is_rejected(current, proposed, reason):
    try:
        new = transition(current, proposed, reason)
    except IllegalTransition:
        assert not legal(current, proposed, reason)
        return
    assert legal(current, proposed, reason)
    assert new is proposed
    assert new >= current


@given(st.lists(st.tuples(statuses, st.booleans()), max_size=30))
def test_any_sequence_of_proposals_is_monotone_and_terminal_sticks(proposals):
    s = Status.Bootstrapping
    seen_terminal = None
    for proposed, with_reason in proposals:
        try:
            s2 = transition(s, proposed, "why" if with_reason else None)
        except IllegalTransition:
            continue
        assert s2 >= s
        if seen_terminal is not None:
            assert s2 is seen_terminal
        s = s2
        if s.is_terminal:
            seen_terminal = s

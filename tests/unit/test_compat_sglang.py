import pytest

from embedlink import Status
from embedlink.compat.sglang import KVPoll, from_kvpoll, to_kvpoll


def test_sglang_kvpoll_values_are_sglangs():
    assert [(k.name, k.value) for k in KVPoll] == [
        ("Failed", 0),
        ("Bootstrapping", 1),
        ("WaitingForInput", 2),
        ("Transferring", 3),
        ("Success", 4),
    ]


@pytest.mark.parametrize("status", list(Status))
def test_sglang_mapping_is_by_name_and_round_trips(status):
    k = to_kvpoll(status)
    assert k.name == status.name
    assert from_kvpoll(int(k)) is status


def test_sglang_failed_is_zero_there_four_here():
    assert to_kvpoll(Status.Failed) == 0 and from_kvpoll(0) is Status.Failed
    assert to_kvpoll(Status.Bootstrapping) == 1


def test_sglang_rejects_unknown_values():
    with pytest.raises(ValueError, match="KVPoll"):
        from_kvpoll(7)

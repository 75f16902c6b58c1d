"""Tripwires: the seams the plugin replaces or relies on, read from the real
SGLang. A refactor upstream turns one of these red (and makes register()
refuse, naming it) instead of leaving the plugin a silent no-op."""

from __future__ import annotations

import inspect
import re

import pytest

pytestmark = pytest.mark.timeout(120)


def test_every_seam_is_where_the_plugin_expects_it():
    from embedlink.integrations.sglang_plugin import check_seams

    assert check_seams() == []


def test_the_scheduler_builds_the_waiting_class_by_its_module_name():
    from sglang.srt.disaggregation.encoder import receiver

    src = inspect.getsource(receiver.MMReceiverHTTP.process_waiting_requests)
    # the class is the module global read at call time (what a REPLACE rebinds)
    assert re.search(r"_process_waiting_requests\(\s*recv_reqs,\s*WaitingZmqRequest\b", src), src
    # ... and passes these keywords, which the replacement accepts as the base does
    body = inspect.getsource(receiver.MMReceiverHTTP._process_waiting_requests)
    for kw in ("rid=", "recv_req=", "mm_processor=", "encoder_urls=", "receive_count=",
               "zmq_context=", "embedding_port="):  # fmt: skip
        assert kw in body, kw


def test_the_encoder_builds_its_delivery_by_its_module_name():
    from sglang.srt.disaggregation.encoder import server

    src = inspect.getsource(server.MMEncoder.__init__)
    assert "ZmqDelivery(" in src
    assert inspect.iscoroutinefunction(server.EncoderDelivery.send)
    assert inspect.iscoroutinefunction(server.EncoderDelivery.release)


def test_the_part_ids_and_unpickler_are_sglangs():
    from sglang.srt.disaggregation.encoder import receiver
    from sglang.srt.utils.common import safe_pickle_loads

    from embedlink.integrations.sglang import part_room

    assert receiver.create_part_req_id("r", 3) == "r_local_part_3"
    data = receiver.EmbeddingData("r_local_part_0", 1, 0, None, None, embedding_shape=[2, 8])
    import pickle

    back = safe_pickle_loads(pickle.dumps(data.copy_without_embedding()))
    assert type(back) is receiver.EmbeddingData and back.shape == [2, 8]
    r = part_room("r_local_part_0")
    assert 0 <= r < 1 << 63 and r != part_room("r_local_part_1")


def test_status_values_match_sglangs_kvpoll():
    from sglang.srt.disaggregation.base.conn import KVPoll as Real

    from embedlink import Status
    from embedlink.compat.sglang import KVPoll, from_kvpoll, to_kvpoll

    for name in ("Failed", "Bootstrapping", "WaitingForInput", "Transferring", "Success"):
        assert int(getattr(KVPoll, name)) == int(getattr(Real, name)), name
        assert to_kvpoll(Status[name]) == getattr(Real, name)
        assert from_kvpoll(getattr(Real, name)) is Status[name]

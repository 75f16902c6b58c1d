import pytest

from embedlink import BufferSchema
from embedlink.protocol import AUX_FIELD, AUX_SIZE, PlanError, plan_chunk

SCHEMA = BufferSchema(hidden_size=4, dtype="bfloat16")  # 8 + 4 + 12 bytes per token


def plan(**kw):
    base = dict(schema=SCHEMA, block_size=4)
    base.update(kw)
    return plan_chunk(**base)


def test_planner_contiguous_blocks_merge_into_one_copy_per_field():
    p = plan(total_tokens=8, sent_tokens=0, src_blocks=[0, 1], dst_blocks=[5, 6])
    data = [c for c in p.copies if c.field != AUX_FIELD]
    assert len(data) == 3
    emb = data[0]
    assert (emb.field, emb.src_offset, emb.dst_offset, emb.length) == (
        "embedding",
        0,
        5 * 4 * 8,
        8 * 8,
    )
    assert p.is_last and p.tokens == 8 and p.end_token == 8


def test_planner_first_chunk_carries_aux_once():
    p = plan(total_tokens=8, sent_tokens=0, src_blocks=[2, 3], dst_blocks=[7, 1])
    aux = [c for c in p.copies if c.field == AUX_FIELD]
    assert aux and aux[0].src_offset == 2 * AUX_SIZE and aux[0].dst_offset == 7 * AUX_SIZE
    p2 = plan(total_tokens=8, sent_tokens=4, src_blocks=[2, 3], dst_blocks=[1])
    assert all(c.field != AUX_FIELD for c in p2.copies)


def test_planner_partial_chunk_is_not_last():
    # The seed's 2000-token case, scaled: reservation smaller than the embedding.
    p = plan(total_tokens=10, sent_tokens=0, src_blocks=[0, 1, 2], dst_blocks=[0, 1])
    assert p.tokens == 8 and not p.is_last
    p2 = plan(total_tokens=10, sent_tokens=8, src_blocks=[0, 1, 2], dst_blocks=[3])
    assert p2.tokens == 2 and p2.is_last and p2.start_token == 8


def test_planner_unaligned_resume_splits_at_block_edges():
    # Source blocks 0, 2, 1 are not adjacent, so every block edge splits a run.
    p = plan(total_tokens=10, sent_tokens=3, src_blocks=[0, 2, 1], dst_blocks=[4, 9], dst_tokens=6)
    assert p.tokens == 6 and not p.is_last
    segs = [(s.src_token, s.dst_token, s.count) for s in p.segments]
    # token 3 (block 0, slot 3) -> dst 16; tokens 4..6 (block 2) -> dst 17..19;
    # token 7 (block 2, slot 3) -> dst block 9 slot 0 = 36; token 8 (block 1, slot 0) -> 37
    assert segs == [(3, 16, 1), (8, 17, 3), (11, 36, 1), (4, 37, 1)]


def test_planner_dst_tokens_caps_the_chunk():
    p = plan(total_tokens=8, sent_tokens=0, src_blocks=[0, 1], dst_blocks=[0, 1], dst_tokens=5)
    assert p.tokens == 5


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"total_tokens": 8, "sent_tokens": 8}, "sent_tokens"),
        ({"total_tokens": 0, "sent_tokens": 0}, "total_tokens"),
        ({"total_tokens": 8, "sent_tokens": -1}, "sent_tokens"),
        ({"total_tokens": 8, "sent_tokens": 0, "dst_blocks": []}, "dst_tokens"),
        ({"total_tokens": 8, "sent_tokens": 0, "dst_blocks": [1, 1]}, "twice"),
        (
            {"total_tokens": 8, "sent_tokens": 0, "dst_blocks": [99], "dst_num_blocks": 10},
            "outside",
        ),
        ({"total_tokens": 80, "sent_tokens": 0}, "cannot hold"),
        ({"total_tokens": 8, "sent_tokens": 0, "dst_tokens": 100}, "dst_tokens"),
    ],
)
def test_planner_rejects_inconsistent_requests(kw, match):
    args = {"src_blocks": [0, 1], "dst_blocks": [2, 3], **kw}
    with pytest.raises(PlanError, match=match):
        plan(**args)

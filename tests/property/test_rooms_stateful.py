"""One sending room and N receiving rooms over an in-memory link that drops,
duplicates and reorders control messages (and fails data writes).

Invariants: status never decreases on either side; a receiver reaches Success
only holding every token byte for byte; sent_tokens never decreases; nothing is
written outside a reservation the receiver offered; after the link quiets and
deadlines pass, every room is terminal and (once dead peers are reaped) both
pools are fully free.
"""

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from embedlink import Status
from tests.helpers import embedding, make_link, same_bytes

BS = 16


class LinkMachine(RuleBasedStateMachine):
    @initialize(
        n_dst=st.integers(1, 3),
        total=st.integers(1, 200),
        reserve=st.integers(1, 100),
        pool=st.integers(1, 8),
        seed=st.integers(0, 1000),
    )
    def setup(self, n_dst, total, reserve, pool, seed):
        self.link = make_link(
            n_dst=n_dst, receiver_blocks=pool, default_tokens=reserve, block_size=BS, timeout=50.0
        )
        self.data = embedding(total, seed=seed)
        self.total = total
        self.sent = False
        self.lost = False
        self.written = {s: 0 for s in self.link.dests}
        self.link.start()

    @precondition(lambda self: not self.sent)
    @rule()
    def send(self):
        assert self.link.send(self.data)
        self.sent = True

    @precondition(lambda self: self.link.wire)
    @rule(i=st.integers(0, 50))
    def deliver(self, i):
        self.link.deliver(i % len(self.link.wire))

    @precondition(lambda self: self.link.wire)
    @rule(i=st.integers(0, 50))
    def duplicate(self, i):
        self.link.deliver(i % len(self.link.wire), keep=True)

    @precondition(lambda self: self.link.wire)
    @rule(i=st.integers(0, 50))
    def drop(self, i):
        self.link.wire.pop(i % len(self.link.wire))
        self.lost = True

    @precondition(lambda self: self.link.writes)
    @rule(i=st.integers(0, 50), ok=st.booleans())
    def write(self, i, ok):
        i %= len(self.link.writes)
        dst, w = self.link.writes[i]
        # nothing written outside the reservation the receiver offered
        room = self.link.dests[dst].room
        assert room.blocks is not None, "write into a receiver holding no reservation"
        allowed = {b * BS + k for b in room.blocks for k in range(BS)}
        for seg in w.plan.segments:
            assert set(range(seg.dst_token, seg.dst_token + seg.count)) <= allowed
        assert w.plan.tokens <= room.tokens
        if ok and not self.link.sender.done:
            self.written[dst] += w.plan.tokens
        self.link.complete_write(i, ok=ok)

    @rule()
    def retry_reservations(self):
        self.link.retry_reservations()

    @rule(dt=st.floats(0, 30))
    def tick(self, dt):
        self.link.tick(dt)

    @invariant()
    def monotone(self):
        for s, d in self.link.dests.items():
            h = d.room.history
            assert [x for x, _ in h] == sorted(x for x, _ in h), h
            toks = [t for _, t in h]
            assert toks == sorted(toks)
            if d.room.status is Status.Success:
                assert same_bytes(self.link.result(s), self.data)
                assert int(d.aux["total_tokens"]) == self.total
        h = self.link.sender.history
        assert [x for x, _ in h] == sorted(x for x, _ in h)
        if self.link.sender.status is Status.Success:
            # Success only when every token reached every destination's memory.
            assert all(n == self.total for n in self.written.values()), self.written

    def teardown(self):
        if not hasattr(self, "link"):
            return
        link = self.link
        if not self.sent:
            link.send(self.data)
        for _ in range(20):
            link.run()
            link.tick(60.0)
        link.run()
        assert link.sender.done
        event(f"sender ended {link.sender.status}; lost messages: {self.lost}")
        for d in link.dests.values():
            assert d.room.done, d.room.history
        if self.lost:
            # A lost abort acknowledgement leaves offered blocks held until the
            # failure detector declares the encoder dead.
            for d in link.dests.values():
                if d.room.holds_blocks:
                    link._run_receiver(d, d.room.peer_dead(link.now, "reaped"))
        assert link.sender_ep.alloc.num_used == 0
        for d in link.dests.values():
            assert d.ep.alloc.num_used == 0, d.room.history


TestLink = LinkMachine.TestCase

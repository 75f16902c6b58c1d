import itertools

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from embedlink import BlockAllocator

N = 32


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.a = BlockAllocator(N)
        self.held: list[list[int]] = []

    @rule(n=st.integers(1, N))
    def alloc(self, n):
        got = self.a.alloc(n)
        used = sum(map(len, self.held))
        if got is None:
            assert N - used < n
        else:
            assert len(got) == n
            self.held.append(got)

    @rule(n=st.integers(1, N))
    def alloc_up_to(self, n):
        got = self.a.alloc_up_to(n)
        used = sum(map(len, self.held))
        if got is None:
            assert used == N
        else:
            assert 1 <= len(got) <= n
            self.held.append(got)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        self.a.free(self.held.pop(i % len(self.held)))

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def double_free_is_rejected(self, i):
        blocks = self.held[i % len(self.held)]
        self.a.free(blocks)
        try:
            self.a.free(blocks)
        except ValueError:
            pass
        else:
            raise AssertionError("double free accepted")
        self.held.remove(blocks)

    @invariant()
    def conserves_blocks(self):
        held = [b for h in self.held for b in h]
        assert len(held) == len(set(held)), "a block handed out twice"
        assert all(0 <= b < N for b in held)
        assert self.a.num_used == len(held)
        free = [b for s, n in self.a.extents() for b in range(s, s + n)]
        assert sorted(free + held) == list(range(N))
        # extents are maximal: no two touch
        ext = self.a.extents()
        assert all(s1 + n1 < s2 for (s1, n1), (s2, _) in itertools.pairwise(ext))


TestAllocator = AllocatorMachine.TestCase

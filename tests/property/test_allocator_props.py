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

    @rule(n=st.integers(1, N), spare=st.integers(1, N))
    def alloc_up_to_with_spare(self, n, spare):
        held = {b for h in self.held for b in h}
        runs = self._free_runs(held)
        free = N - len(held)
        # a free run that starts with another reservation's spare offers only
        # what follows that spare (the allocator leaves it for the other room
        # to grow into); read before the call, which may add a spare
        others = dict(self.a._spares)
        got = self.a.alloc_up_to(n, spare)
        if got is None:
            assert free == 0
            return
        want = min(n, free)
        assert len(got) == want
        if any(k - others.get(s, 0) >= want + spare for s, k in runs):
            # room for it and its spare: one contiguous run, its spare free
            assert got == list(range(got[0], got[0] + want))
            assert not held & set(range(got[-1] + 1, got[-1] + 1 + spare))
            assert got[-1] + spare < N
        self.held.append(got)

    @rule(n=st.integers(1, N))
    def alloc_contiguous(self, n):
        got = self.a.alloc_contiguous(n)
        held = {b for h in self.held for b in h}
        longest = max((k for _, k in self._free_runs(held)), default=0)
        if got is None:
            assert longest < n
        else:
            assert got == list(range(got[0], got[0] + n))
            self.held.append(got)

    @rule(start=st.integers(-2, N + 2), n=st.integers(1, N))
    def alloc_at(self, start, n):
        held = {b for h in self.held for b in h}
        fits = start >= 0 and start + n <= N and not held & set(range(start, start + n))
        got = self.a.alloc_at(start, n)
        if fits:
            assert got == list(range(start, start + n))
            self.held.append(got)
        else:
            assert got is None

    @staticmethod
    def _free_runs(held):
        runs, start = [], None
        for b in range(N + 1):
            free = b < N and b not in held
            if free and start is None:
                start = b
            elif not free and start is not None:
                runs.append((start, b - start))
                start = None
        return runs

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

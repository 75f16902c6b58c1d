"""Real processes on loopback, port 0, hard timeouts."""

import multiprocessing as mp
import queue

import pytest

from embedlink.tools.workers import encoder_worker, language_worker

CTX = mp.get_context("spawn")


class EncoderProc:
    """An encoder endpoint in its own OS process, driven by commands."""

    def __init__(self, cfg):
        self.cmds = CTX.Queue()
        self.replies = CTX.Queue()
        self.proc = CTX.Process(
            target=encoder_worker, args=(cfg, self.cmds, self.replies), daemon=True
        )
        self.proc.start()
        kind, self.address = self.replies.get(timeout=60)
        assert kind == "ready"

    def call(self, *cmd, timeout=60):
        self.cmds.put(cmd)
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"encoder did not answer {cmd[0]!r} within {timeout}s") from None
        if reply[0] == "error":
            raise RuntimeError(reply[1])
        return reply

    def stop(self):
        if self.proc.is_alive():
            self.cmds.put(("stop",))
            self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


class LanguageProc:
    def __init__(self, cfg, jobs):
        self.out = CTX.Queue()
        self.proc = CTX.Process(target=language_worker, args=(cfg, jobs, self.out), daemon=True)
        self.proc.start()

    def results(self, n, timeout):
        got = []
        while True:
            try:
                item = self.out.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(
                    f"language process silent for {timeout}s after {len(got)}/{n}"
                ) from None
            if isinstance(item, tuple):
                if item[0] == "crashed":
                    raise RuntimeError(item[1])
                return got, item
            got.append(item)

    def stop(self):
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


@pytest.fixture
def spawn_encoder():
    procs = []

    def make(**cfg):
        p = EncoderProc(cfg)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()


@pytest.fixture
def spawn_language():
    procs = []

    def make(cfg, jobs):
        p = LanguageProc(cfg, jobs)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()

"""A peer process for the network-namespace test, run inside a namespace:

    python -m tests.integration.netns_peer encoder HOST ROOMS TRANSPORT
    python -m tests.integration.netns_peer language HOST BOOTSTRAP ROOMS TRANSPORT

The encoder side runs the bootstrap server and an encoder bound to HOST,
prints ``READY <bootstrap address>``, sends every room, and prints one JSON
line of final statuses. The language side, bound to its own HOST, receives
every room through that bootstrap server, verifies it, and prints one JSON line
of results. Every wait is bounded.
"""

import json
import sys

from embedlink import (
    BootstrapServer,
    BufferSchema,
    EncoderEndpoint,
    LanguageEndpoint,
    TransferError,
)
from embedlink.tools.workers import make_embedding, same_embedding

SCHEMA = BufferSchema(hidden_size=512)


def sizes(rooms: int) -> list[tuple[int, int]]:
    return [(r, 300 + 700 * r) for r in range(rooms)]


def encoder(host: str, rooms: int, transport: str) -> None:
    with (
        BootstrapServer(host=host, port=0) as boot,
        EncoderEndpoint(
            SCHEMA,
            bootstrap=boot.address,
            host=host,
            num_blocks=256,
            transports=(transport,),
            room_timeout=30,
        ) as enc,
    ):
        print("READY", boot.address, flush=True)
        senders = []
        for room, n in sizes(rooms):
            tx = enc.sender(room)
            tx.send(make_embedding(SCHEMA, n, 0, room), timeout=30)
            senders.append(tx)
        out = {tx.room: [int(tx.wait(60)), tx.failure_reason] for tx in senders}
        print(json.dumps({"statuses": out, "sessions": enc.sessions()}), flush=True)
        sys.stdin.readline()  # keep serving until the test has read the language side


def language(host: str, bootstrap: str, rooms: int, transport: str) -> None:
    results = {}
    with LanguageEndpoint(
        SCHEMA, host=host, num_blocks=32, transports=(transport,), room_timeout=30
    ) as lang:
        rxs = [(room, n, lang.receiver(bootstrap=bootstrap, room=room)) for room, n in sizes(rooms)]
        for room, n, rx in rxs:
            try:
                ok = same_embedding(rx.wait(timeout=60), make_embedding(SCHEMA, n, 0, room))
                results[room] = [ok, [int(s) for s, _ in rx.history]]
            except (TransferError, TimeoutError) as exc:
                results[room] = [False, str(exc)]
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "encoder":
        encoder(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        language(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])

"""The ``embedlink`` command line."""

from __future__ import annotations

import time
from typing import Any

import click
import ml_dtypes
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .protocol import PROTOCOL_VERSION, BufferSchema, Status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """embedlink: move multimodal embeddings from encoders to LLM prefill workers."""


@main.command()
def version() -> None:
    """Print the package and wire-protocol versions."""
    click.echo(f"embedlink {__version__} (protocol {PROTOCOL_VERSION})")


def _make_embedding(rng: np.random.Generator, n: int, hidden: int) -> dict[str, Any]:
    return {
        "embedding": rng.standard_normal((n, hidden), dtype=np.float32).astype(ml_dtypes.bfloat16),
        "token_ids": rng.integers(0, 152_000, size=n, dtype=np.int32),
        "mrope_positions": rng.integers(0, 4096, size=(n, 3), dtype=np.int32),
    }


@main.command()
@click.option("--requests", "-n", default=200, show_default=True, help="Requests to send.")
@click.option("--min-tokens", default=64, show_default=True)
@click.option("--max-tokens", default=8192, show_default=True)
@click.option("--hidden-size", default=3584, show_default=True, help="Qwen2.5-VL-7B: 3584.")
@click.option(
    "--default-tokens",
    default=1024,
    show_default=True,
    help="Reservation before the length is known.",
)
@click.option("--block-size", default=128, show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo(
    requests: int,
    min_tokens: int,
    max_tokens: int,
    hidden_size: int,
    default_tokens: int,
    block_size: int,
    seed: int,
) -> None:
    """Send embeddings of realistic lengths through the protocol and verify every byte.

    This runs the protocol core over real block pools in one process; the
    multi-process pipeline (encoder, language and bootstrap processes) arrives
    with the pipeline issue.
    """
    from .sim import Link

    if not 1 <= min_tokens <= max_tokens:
        raise click.BadParameter("need 1 <= --min-tokens <= --max-tokens")
    console = Console()
    schema = BufferSchema(hidden_size=hidden_size)
    rng = np.random.default_rng(seed)
    sizes = rng.integers(min_tokens, max_tokens + 1, size=requests)
    sender_blocks = -(-max_tokens // block_size)
    finals: dict[Status, int] = {}
    resumes = 0
    nbytes = 0
    lat: list[float] = []
    bad = 0
    t0 = time.perf_counter()
    with Progress(
        TextColumn("[bold]demo"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("requests", total=requests)
        for i, n in enumerate(sizes):
            n = int(n)
            arrays = _make_embedding(rng, n, hidden_size)
            ts = time.perf_counter()
            link = Link(
                schema,
                block_size=block_size,
                sender_blocks=sender_blocks,
                receiver_blocks=max(sender_blocks, -(-default_tokens // block_size)),
                default_tokens=default_tokens,
                room=i,
            )
            link.start()
            link.send(arrays)
            link.run()
            lat.append(time.perf_counter() - ts)
            room = link.dests["lang-0"].room
            finals[room.status] = finals.get(room.status, 0) + 1
            resumes += sum(1 for s, t in room.history if s is Status.Transferring and t > 0)
            got = link.result("lang-0")
            ok = room.status is Status.Success and all(
                np.array_equal(got[k].view(np.uint8), v.view(np.uint8)) for k, v in arrays.items()
            )
            bad += not ok
            nbytes += n * schema.token_bytes
            bar.advance(task)
    wall = time.perf_counter() - t0
    table = Table(title="embedlink demo (in-process protocol core)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for st in Status:
        if finals.get(st):
            table.add_row(f"rooms {st}", str(finals[st]))
    table.add_row("resumes", str(resumes))
    table.add_row("bytes", f"{nbytes / 1e6:,.1f} MB")
    table.add_row("throughput", f"{nbytes / wall / 1e9:.2f} GB/s")
    table.add_row("p50 latency", f"{np.percentile(lat, 50) * 1e3:.2f} ms")
    table.add_row("p99 latency", f"{np.percentile(lat, 99) * 1e3:.2f} ms")
    table.add_row("verified byte for byte", f"{requests - bad}/{requests}")
    console.print(table)
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

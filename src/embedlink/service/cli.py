"""The ``embedlink`` command line."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click
import numpy as np
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import __version__
from ..examples import MODELS, PERTURBATIONS
from ..protocol import PROTOCOL_VERSION, BufferSchema, EmbedlinkError, Status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    envvar="EMBEDLINK_LOG_LEVEL",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False),
    help="Logging level, for this process and the ones it starts.",
)
@click.option("--log-json", is_flag=True, envvar="EMBEDLINK_LOG_JSON", help="Log JSON lines.")
def main(log_level: str, log_json: bool) -> None:
    """embedlink: move multimodal embeddings from encoders to LLM prefill workers."""
    from ..observability.logs import setup_logging

    setup_logging(log_level, log_json)


@main.command()
def version() -> None:
    """Print the package and wire-protocol versions."""
    click.echo(f"embedlink {__version__} (protocol {PROTOCOL_VERSION})")


@main.command()
@click.option(
    "--model",
    type=click.Choice(list(MODELS)),
    default=None,
    help="Run a real vision-language model (transformers, built in code with seeded random "
    "weights) split across an encoder and a language process, and check its output bitwise "
    "against the same model in one process. Needs embedlink[examples].",
)
@click.option(
    "--requests",
    "-n",
    type=int,
    default=None,
    help="Requests to send [200; with --model: 8, one per built-in image set].",
)
@click.option("--min-tokens", default=64, show_default=True)
@click.option("--max-tokens", default=8192, show_default=True)
@click.option("--hidden-size", default=3584, show_default=True, help="Qwen2.5-VL-7B: 3584.")
@click.option(
    "--default-tokens",
    type=int,
    default=None,
    help="Reservation before the length is known [1024; with --model: 256].",
)
@click.option("--block-size", default=128, show_default=True)
@click.option("--transport", type=click.Choice(["shm", "tcp"]), default="shm", show_default=True)
@click.option(
    "--encoder-blocks", type=int, default=None, help="Encoder pool (default: 4 x max-tokens)."
)
@click.option(
    "--language-blocks", type=int, default=None, help="Language pool (default: max-tokens)."
)
@click.option(
    "--window", default=16, show_default=True, help="Requests in flight at the language side."
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--timeout", default=600.0, show_default=True, help="Give up after this many seconds."
)
@click.option(
    "--new-tokens", type=int, default=None, help="With --model: tokens generated per request [8]."
)
@click.option(
    "--dtype",
    "dtypes",
    type=click.Choice(["float32", "bfloat16"]),
    multiple=True,
    help="With --model: the model's dtype; repeat for several [float32 and bfloat16].",
)
@click.option(
    "--threads",
    type=int,
    default=None,
    help="With --model: torch threads in each of the three processes [1].",
)
@click.option(
    "--perturb",
    multiple=True,
    metavar="ROOM:KIND",
    help="With --model: change room ROOM's embedding at the encoder, to watch the check fail; "
    f"KIND is one of {', '.join(PERTURBATIONS)}. Repeatable.",
)
@click.pass_context
def demo(
    click_ctx: click.Context,
    model: str | None,
    requests: int | None,
    min_tokens: int,
    max_tokens: int,
    hidden_size: int,
    default_tokens: int | None,
    block_size: int,
    transport: str,
    encoder_blocks: int | None,
    language_blocks: int | None,
    window: int,
    seed: int,
    timeout: float,
    new_tokens: int | None,
    dtypes: tuple[str, ...],
    threads: int | None,
    perturb: tuple[str, ...],
) -> None:
    """Run the whole pipeline on this machine and verify every byte.

    Starts a bootstrap server (here), an encoder process and a language
    process, sends REQUESTS embeddings of random lengths with a default
    reservation of DEFAULT_TOKENS (so the longer ones resume), verifies each
    byte for byte at the language side, and prints a summary. Exits non-zero
    if any request fails.

    With --model, the encoder runs the model's processor and vision tower on
    real images of several sizes, the language process runs prefill and
    greedy decoding from what arrived, a third process runs the whole model
    on the same prompts, and the demo prints each request's tokens both ways
    and whether every logit is bitwise equal. Exits non-zero on any
    difference.
    """
    import multiprocessing as mp
    import queue

    from ..bootstrap import BootstrapServer
    from ..tools.workers import RoomResult, encoder_worker, language_worker

    given = {
        name
        for name in click_ctx.params
        if click_ctx.get_parameter_source(name)
        in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    }

    def flags(names: set[str]) -> str:
        return ", ".join(sorted(p.opts[0] for p in click_ctx.command.params if p.name in names))

    synthetic_only = {
        "min_tokens",
        "max_tokens",
        "hidden_size",
        "encoder_blocks",
        "language_blocks",
    }
    model_only = {"new_tokens", "dtypes", "threads", "perturb"}
    if model is not None:
        if given & synthetic_only:
            raise click.UsageError(
                f"{flags(given & synthetic_only)}: not with --model (the model makes the embeddings)"
            )
        _demo_model(
            model,
            requests=requests,
            default_tokens=256 if default_tokens is None else default_tokens,
            block_size=block_size,
            transport=transport,
            window=window,
            seed=seed,
            timeout=timeout,
            new_tokens=8 if new_tokens is None else new_tokens,
            dtypes=dtypes or ("float32", "bfloat16"),
            threads=1 if threads is None else threads,
            perturb=perturb,
        )
        return
    if given & model_only:
        raise click.UsageError(f"{flags(given & model_only)}: only with --model")
    requests = 200 if requests is None else requests
    default_tokens = 1024 if default_tokens is None else default_tokens
    if not 1 <= min_tokens <= max_tokens:
        raise click.BadParameter("need 1 <= --min-tokens <= --max-tokens")
    if requests < 1:
        raise click.BadParameter("--requests must be at least 1")
    console = Console()
    rng = np.random.default_rng(seed)
    jobs = [
        (i, int(n)) for i, n in enumerate(rng.integers(min_tokens, max_tokens + 1, size=requests))
    ]
    per_max = -(-max_tokens // block_size)
    enc_blocks = encoder_blocks or 4 * per_max
    lang_blocks = language_blocks or max(per_max, -(-default_tokens // block_size) + 1)
    schema = BufferSchema(hidden_size=hidden_size)
    ctx = mp.get_context("spawn")
    results: list[RoomResult] = []
    with BootstrapServer(host="127.0.0.1", port=0) as boot:
        common = dict(
            bootstrap=boot.address,
            hidden_size=hidden_size,
            block_size=block_size,
            transports=(transport,),
            seed=seed,
            room_timeout=120.0,
        )
        cmds, replies, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
        enc = ctx.Process(
            target=encoder_worker,
            name="embedlink-encoder",
            args=({**common, "num_blocks": enc_blocks}, cmds, replies),
            daemon=True,
        )
        lang = ctx.Process(
            target=language_worker,
            name="embedlink-language",
            args=(
                {
                    **common,
                    "num_blocks": lang_blocks,
                    "default_tokens": default_tokens,
                    "window": window,
                },
                jobs,
                out,
            ),
            daemon=True,
        )
        enc.start()
        try:
            replies.get(timeout=60)
            lang.start()
            cmds.put(("send_many", jobs))
            t0 = time.perf_counter()
            with Progress(
                TextColumn("[bold]demo"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[rate]}"),
                console=console,
            ) as bar:
                task = bar.add_task("requests", total=requests, rate="")
                end: Any = None
                while end is None:
                    try:
                        item = out.get(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
                    except queue.Empty:
                        raise click.ClickException(f"no progress within {timeout:g}s") from None
                    if isinstance(item, RoomResult):
                        results.append(item)
                        done_bytes = sum(r.nbytes for r in results)
                        rate = f"{done_bytes / (time.perf_counter() - t0) / 1e9:.2f} GB/s"
                        bar.update(task, advance=1, rate=rate)
                    else:
                        end = item
            wall = time.perf_counter() - t0
            if end[0] == "crashed":
                raise click.ClickException(f"language process crashed:\n{end[1]}")
            cmds.put(("wait_idle", 30.0))
            enc_reply = replies.get(timeout=60)
            while enc_reply[0] != "idle":
                enc_reply = replies.get(timeout=60)
        finally:
            cmds.put(("stop",))
            for p in (enc, lang):
                p.join(10)
                if p.is_alive():
                    p.kill()
    _summary(console, schema, results, wall, transport, end, enc_reply)
    if any(not r.ok for r in results) or len(results) != requests:
        raise SystemExit(1)


def _demo_model(
    model: str,
    *,
    requests: int | None,
    default_tokens: int,
    block_size: int,
    transport: str,
    window: int,
    seed: int,
    timeout: float,
    new_tokens: int,
    dtypes: tuple[str, ...],
    threads: int,
    perturb: tuple[str, ...],
) -> None:
    """``embedlink demo --model``: see :mod:`embedlink.examples.vlm_demo`."""
    from ..examples import missing_dependencies

    missing = missing_dependencies()
    if missing:
        raise click.ClickException(
            f"--model needs torch, transformers, tokenizers and Pillow (missing: "
            f"{', '.join(missing)}): pip install 'embedlink[examples]'"
        )
    from ..examples import vlm_demo

    changes: dict[int, str] = {}
    for item in perturb:
        room, sep, kind = item.partition(":")
        if not sep or not room.strip().isdigit():
            raise click.BadParameter(f"{item!r}: expected ROOM:KIND", param_hint="--perturb")
        changes[int(room)] = kind.strip()
    if requests is not None and requests < 1:
        raise click.BadParameter("must be at least 1", param_hint="--requests")
    console = Console()
    n_cases = len(dtypes)
    n_rooms = requests or len(vlm_demo.DEFAULT_REQUESTS)
    with Progress(
        TextColumn(f"[bold]demo --model {model}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[last]}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("rooms", total=n_cases * n_rooms, last="starting the processes")
        try:
            result = vlm_demo.run(
                [model],
                dtypes,
                requests=requests,
                new_tokens=new_tokens,
                threads=threads,
                default_tokens=default_tokens,
                block_size=block_size,
                transport=transport,
                window=window,
                seed=seed,
                perturb=changes,
                timeout=timeout,
                progress=lambda line: bar.update(task, advance=1, last=line),
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        except (RuntimeError, TimeoutError) as exc:
            raise click.ClickException(str(exc)) from None
    vlm_demo.report(result, console)
    if not result.ok:
        raise SystemExit(1)


def _summary(
    console: Console,
    schema: BufferSchema,
    results: list[Any],
    wall: float,
    transport: str,
    end: Any,
    enc_reply: Any,
) -> None:
    finals: dict[Status, int] = {}
    for r in results:
        finals[Status(r.status)] = finals.get(Status(r.status), 0) + 1
    resumes = sum(sum(1 for s, _ in r.history if s == Status.Transferring) for r in results)
    resumed_rooms = sum(1 for r in results if any(s == Status.Transferring for s, _ in r.history))
    nbytes = sum(r.nbytes for r in results)
    lat = np.array([r.latency for r in results]) if results else np.zeros(1)
    table = Table(
        title=f"embedlink demo over {transport} (encoder and language in separate processes)"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for st in Status:
        if finals.get(st):
            table.add_row(f"requests {st}", str(finals[st]))
    table.add_row("requests that resumed", str(resumed_rooms))
    table.add_row("resumes", str(resumes))
    table.add_row("bytes moved", f"{nbytes / 1e9:,.2f} GB")
    table.add_row("throughput (incl. generating and verifying)", f"{nbytes / wall / 1e9:.2f} GB/s")
    table.add_row(
        "latency p50 (receiver created -> verified)", f"{np.percentile(lat, 50) * 1e3:.1f} ms"
    )
    table.add_row("latency p99", f"{np.percentile(lat, 99) * 1e3:.1f} ms")
    ok = sum(r.ok for r in results)
    table.add_row("verified byte for byte", f"{ok}/{len(results)}")
    table.add_row("pool blocks in use at the end (enc, lang)", f"{enc_reply[2][0]}, {end[1][0]}")
    console.print(table)
    for r in results:
        if not r.ok:
            console.print(f"[red]room {r.room} ({r.tokens} tokens): {Status(r.status)}: {r.reason}")


_PEER_BENCHES = {
    # peer: (package, module, its test environment, the script that makes it, what it needs)
    "vllm": ("vllm", "embedlink.tools.vllm_bench", ".venv-vllm", "scripts/setup_vllm.sh",
             "vLLM 0.33.0: pip install 'embedlink[vllm]'"),
    "sglang": ("sglang", "embedlink.tools.sglang_bench", ".venv-sglang",
               "scripts/setup_sglang.sh", "SGLang 0.5.23: pip install 'embedlink[sglang]'"),
}  # fmt: skip


def _bench_peer(peer: str, quick: bool, as_json: bool) -> None:
    """Run a serving engine's bench where the engine is: this interpreter if
    it has the engine, else the test environment its setup script makes."""
    import importlib.util
    import os
    import subprocess
    import sys
    import tempfile

    package, module, venv, script, needs = _PEER_BENCHES[peer]
    python = sys.executable
    if importlib.util.find_spec(package) is None:
        python = os.path.join(os.getcwd(), venv, "bin", "python")
        if not os.path.exists(python):
            raise click.ClickException(
                f"the {peer} bench needs {needs}, or run {script} here (it makes {venv})"
            )
    args = [python, "-m", module] + (["--quick"] if quick else [])
    env = {**os.environ, "VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", "cpu")}
    if not as_json:
        sys.exit(subprocess.call(args, env=env))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        rc = subprocess.call([*args, "--json", path], env=env, stdout=subprocess.DEVNULL)
        if os.path.exists(path):
            with open(path) as f:
                click.echo(f.read())
        sys.exit(rc)


@main.command()
@click.option(
    "--transport",
    "-t",
    "transports",
    multiple=True,
    type=click.Choice(["shm", "tcp", "mooncake", "cuda_ipc", "nixl"]),
    help="Transport(s) to measure (default: shm, tcp and mooncake).",
)
@click.option("--quick", is_flag=True, help="A short run (under a minute): fewer sizes and rooms.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON list of rows instead of a table."
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a PNG of GB/s against payload (needs matplotlib).",
)
@click.option("--window", default=8, show_default=True, help="Rooms in flight.")
@click.option("--hidden-size", default=3584, show_default=True)
@click.option("--rooms", type=int, default=None, help="Rooms per row (default: by payload).")
@click.option(
    "--device", default=None, help="Pools on this torch device (e.g. cuda:0); default host memory."
)
@click.option(
    "--copying",
    is_flag=True,
    help="Measure send() and reassembling receives, not the one-copy path.",
)
@click.option(
    "--pin/--no-pin",
    default=False,
    show_default=True,
    help="Run the encoder and the language process on one CPU each (needs two CPUs). "
    "See docs/performance.md.",
)
@click.option(
    "--busy-poll-us",
    type=click.FloatRange(0, 1e6),
    default=None,
    help="The endpoints' busy_poll_us setting (default: its default, 400); 0 measures "
    "endpoints that always sleep between messages.",
)
@click.option(
    "--peers",
    type=click.Choice(["vllm", "sglang"]),
    default=None,
    help="Instead: embedlink's vLLM connector against vLLM's own EC connectors, through "
    "vLLM's real Scheduler and worker hooks (needs vLLM 0.33.0: scripts/setup_vllm.sh); "
    "or the SGLang plugin against SGLang's own zmq_to_scheduler path, through SGLang's real "
    "encoder server and scheduler receiver (needs SGLang 0.5.23: scripts/setup_sglang.sh).",
)
def bench(
    transports: tuple[str, ...],
    quick: bool,
    as_json: bool,
    plot_path: str | None,
    window: int,
    hidden_size: int,
    rooms: int | None,
    device: str | None,
    copying: bool,
    pin: bool,
    busy_poll_us: float | None,
    peers: str | None,
) -> None:
    """End-to-end throughput and latency beside each transport's raw limit.

    Rows: transport x payload (64, 2000, 16384 tokens) x mode (exact
    reservation, or the default 1024 so larger rooms resume). Each row reports
    GB/s, the raw limit of that transport measured in this run and their
    ratio, rooms/s, p50/p99 latency and the peak RSS of both processes.
    """
    if peers is not None:
        _bench_peer(peers, quick, as_json)
        return
    from ..tools.bench import QUICK_SIZES, SIZES, _probes, plot, rows_json, run_bench
    from ..transports import TransportUnavailable, get_backend

    chosen = transports or ("shm", "tcp", "mooncake")
    for t in chosen:  # a missing engine: its install command, before anything starts
        try:
            get_backend(t)
        except TransportUnavailable as exc:
            raise click.ClickException(str(exc)) from None
    sizes = QUICK_SIZES if quick else SIZES
    modes = ("exact", "resume")
    token_bytes = BufferSchema(hidden_size=hidden_size).token_bytes

    def rooms_for(n: int) -> int:
        if rooms is not None:
            return rooms
        if quick:
            return 300 if n <= 64 else 24
        return max(16, min(3000, int(3e9 // (n * token_bytes))))

    console = Console(stderr=as_json)
    total = len(chosen) * (len(sizes) * len(modes) + len(_probes(sizes, modes)))
    with Progress(
        TextColumn("[bold]bench"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
    ) as bar:
        task = bar.add_task("starting", total=total)
        started = [False]

        def progress(msg: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=msg)

        rows, extras = run_bench(
            transports=chosen,
            sizes=sizes,
            modes=modes,
            rooms_for=rooms_for,
            window=window,
            hidden_size=hidden_size,
            progress=progress,
            device=device,
            one_copy=not copying,
            pin=pin,
            busy_poll_us=busy_poll_us,
        )
        bar.update(task, completed=total, description="done")
    if plot_path:
        try:
            plot(rows, plot_path)
        except ImportError:
            console.print(
                "[yellow]matplotlib is not installed: pip install 'embedlink[bench]' for --plot"
            )
    summary = _bench_summary(rows, extras["zmq_rtt_ms"])
    placed = rows[0].cpus if rows else ""
    summary.append(
        f"encoder / language processes pinned to CPUs {placed}"
        if placed
        else "processes not pinned" + (" (--pin needs two CPUs)" if pin else "")
    )
    summary.append(
        f"endpoints busy-poll {extras['busy_poll_us']:.0f} us after each message (--busy-poll-us)"
        if extras["busy_poll_us"]
        else "endpoints sleep between messages (--busy-poll-us 0)"
    )
    if "memcpy_hot_gbps" in extras:
        summary.append(
            f"shm's raw limit is a memcpy cycling through pool-sized buffers, as the rows do; "
            f"one {int(extras['memcpy_hot_tokens'])}-token buffer copied over and over, hot in "
            f"the cache, runs at {extras['memcpy_hot_gbps']:.2f} GB/s"
        )
    if "mooncake_polled_gbps" in extras:
        summary.append(
            f"mooncake's raw limit is the engine's batch_transfer_sync_write; two "
            f"{int(extras['mooncake_polled_tokens'])}-token writes in flight, cut into "
            f"requests and polled as the transport does by default, run at "
            f"{extras['mooncake_polled_gbps']:.2f} GB/s"
        )
    paths = {k.rsplit("_", 1)[1]: v for k, v in extras.items() if k.startswith("nixl_ucx_path_")}
    if paths:
        summary.append(
            "nixl's raw limit is one NIXL WRITE with a notification into another process's "
            "registered memory, its status looked at without pause; UCX carried the bytes over "
            + ", ".join(f"{v} ({n} tokens)" for n, v in paths.items())
        )
    if as_json:
        for line in summary:  # on stderr, beside the progress bar
            console.print(line)
        click.echo(rows_json(rows))
        return
    if not console.is_terminal:
        console.width = max(console.width, 150)  # piped: no terminal to fit
    # a narrow terminal gets the columns the targets are about (--json has all)
    wide = console.width >= 130
    table = _bench_table(
        rows,
        f"embedlink bench ({'copying' if copying else 'one-copy'} path, window {window}, "
        f"hidden {hidden_size}; ZeroMQ 100-byte round trip between two processes p50 "
        f"{extras['zmq_rtt_ms']:.3f} ms)",
        wide,
    )
    console.print(table)
    if not wide:
        summary.append("(a narrow terminal: p99, RSS and more are in --json)")
    for line in summary:
        console.print(line)
    if not all(r.verified for r in rows):
        raise SystemExit(1)


def _bench_table(rows: list[Any], title: str, wide: bool) -> Table:
    """The bench's rows as a table; ``wide=False`` keeps the columns the
    targets are about."""
    columns: list[tuple[str, Callable[[Any], str], bool]] = [
        ("transport", lambda r: r.transport, True),
        ("tokens", lambda r: str(r.tokens), True),
        ("mode", lambda r: r.mode, True),
        ("in flight" if wide else "w", lambda r: str(r.window), True),
        ("rooms", lambda r: str(r.rooms), wide),
        ("GB/s", lambda r: f"{r.gbps:.2f}", True),
        ("raw GB/s" if wide else "raw", lambda r: f"{r.raw_gbps:.2f}", True),
        ("ratio", lambda r: f"{r.ratio_to_raw:.2f}", True),
        ("rooms/s", lambda r: f"{r.rooms_per_s:,.0f}", True),
        ("p50 ms", lambda r: f"{r.p50_ms:.2f}", True),
        ("p99 ms", lambda r: f"{r.p99_ms:.2f}", wide),
        ("resumes/room", lambda r: f"{r.resumes_per_room:.1f}", wide),
        ("RSS enc/lang MB", lambda r: f"{r.rss_encoder_mb:,.0f}/{r.rss_language_mb:,.0f}", wide),
        ("ok", lambda r: "yes" if r.verified else "NO", True),
    ]
    # narrow: no outer border, so ten columns fit 80 characters
    table = (
        Table(title=title)
        if wide
        else Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    )
    shown = [(name, cell) for name, cell, keep in columns if keep]
    for name, _ in shown:
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(*(cell(r) for _, cell in shown))
    return table


def _bench_summary(rows: list[Any], rtt_ms: float) -> list[str]:
    """The targets' derived figures, per transport, from the one-in-flight rows."""
    out = []
    for t in dict.fromkeys(r.transport for r in rows):
        probes = {(r.tokens, r.mode): r for r in rows if r.transport == t and r.window == 1}
        if not probes:
            continue
        small = min(n for n, _ in probes)
        parts = [
            f"{t}, one room in flight: {small} tokens p50 {probes[(small, 'exact')].p50_ms:.2f} ms "
            f"({probes[(small, 'exact')].p50_ms / rtt_ms:.1f}x the ZeroMQ round trip)"
        ]
        big = [n for n, m in probes if m == "resume"]
        if big and (big[0], "exact") in probes:
            ex, rs = probes[(big[0], "exact")], probes[(big[0], "resume")]
            parts.append(
                f"{big[0]} tokens resumed / exact p50 {rs.p50_ms:.2f} / {ex.p50_ms:.2f} ms "
                f"= {rs.p50_ms / ex.p50_ms:.2f}x"
            )
        out.append("; ".join(parts))
    return out


def _config_options(role: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Click options for every setting of ``role`` (all default None, so the
    configuration layer can tell a given flag from an absent one), plus
    ``--config`` and ``--print-config``."""
    from ..config import settings_for

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for s in reversed(settings_for(role)):
            env = s.env + (f", {s.sglang}" if s.sglang else "")
            default = s.default_for(role)
            shown = (
                "unset"
                if default is None
                else (",".join(default) if isinstance(default, tuple) else default)
            )
            help_text = f"{s.help} [env: {env}; default: {shown}]"
            py_type: Any = {"int": int, "float": float, "str": str, "list": str}.get(s.type, str)
            if s.type == "bool":
                fn = click.option(
                    f"{s.flag}/--no-{s.flag[2:]}", s.name, default=None, help=help_text
                )(fn)
            elif s.type == "list":
                fn = click.option(
                    s.flag.rstrip("s"),
                    s.flag,
                    s.name,
                    multiple=True,
                    type=py_type,
                    help=help_text + " (repeatable)",
                )(fn)
            else:
                fn = click.option(s.flag, s.name, type=py_type, default=None, help=help_text)(fn)
        fn = click.option(
            "--print-config",
            is_flag=True,
            help="Print the resolved settings and where each came from, then exit.",
        )(fn)
        fn = click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            default=None,
            help="TOML file of settings [env: EMBEDLINK_CONFIG]. Precedence: flag > "
            "EMBEDLINK_* > SGLang's variable > the file's [command] table > its top level "
            "> default.",
        )(fn)
        return fn

    return decorate


def _load_config(role: str, flags: dict[str, Any], config_file: str | None, show: bool) -> Any:
    from ..config import ConfigError, load

    # "--transport a,b" works as well as "--transport a --transport b"
    if flags.get("transports"):
        flags["transports"] = tuple(
            t.strip() for item in flags["transports"] for t in item.split(",") if t.strip()
        )
    try:
        cfg = load(role, flags, config_file=config_file)
    except ConfigError as exc:
        raise click.ClickException(f"invalid configuration: {exc}") from None
    if show:
        for name, value, source in cfg.describe():
            click.echo(f"{name:<22} {value:<26} # {source}")
        raise SystemExit(0)
    return cfg


def _stop_on_sigterm(stop: Any) -> None:
    import signal

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)


@main.command()
@_config_options("bootstrap")
def bootstrap(config_file: str | None, print_config: bool, **flags: Any) -> None:
    """Run a standalone bootstrap server until interrupted (SIGINT or SIGTERM)."""
    import threading

    from ..bootstrap import BootstrapServer

    cfg = _load_config("bootstrap", flags, config_file, print_config)
    try:
        server = BootstrapServer(
            host=cfg["host"], port=cfg["port"], auth_secret=cfg["auth_secret"]
        ).start()
    except Exception as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"embedlink bootstrap server on http://{server.address} (GET /health, /status)")
    stop = threading.Event()
    _stop_on_sigterm(stop)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


@main.command()
@_config_options("encoder")
def encoder(config_file: str | None, print_config: bool, **flags: Any) -> None:
    """Run one encoder rank until interrupted (SIGINT or SIGTERM).

    Registers with the bootstrap server (if given) and serves every room a
    language rank asks for: the embedding comes from --hook (module:function
    taking (room, schema) and returning an Embedding) or, by default, is a
    synthetic one that `embedlink language` verifies byte for byte.
    """
    import threading

    from .standalone import run_encoder

    cfg = _load_config("encoder", flags, config_file, print_config)
    stop = threading.Event()
    _stop_on_sigterm(stop)

    def ready(ep: Any) -> None:
        where = (
            f"; /status and /metrics on http://{ep.metrics_address}" if ep.metrics_address else ""
        )
        click.echo(
            f"embedlink encoder rank {ep.tp_rank} on {ep.address} "
            f"(transports {','.join(ep.transports)}){where}",
        )

    try:
        counts = run_encoder(cfg, stop, on_ready=ready)
    except KeyboardInterrupt:
        return
    except (ValueError, OSError, RuntimeError, EmbedlinkError) as exc:
        raise click.ClickException(f"encoder failed to start: {exc}") from None
    click.echo(f"stopped: {counts['sent']} rooms sent, {counts['refused']} refused")


@main.command()
@_config_options("language")
def language(config_file: str | None, print_config: bool, **flags: Any) -> None:
    """Receive --rooms rooms from the encoder(s) behind --bootstrap and report.

    Each embedding goes to --hook (module:function taking (room, embedding))
    or, by default, is compared byte for byte with the synthetic one the
    encoder generates for that room. Exits non-zero when any room failed.
    """
    from ..bootstrap import BootstrapError
    from .standalone import run_language

    cfg = _load_config("language", flags, config_file, print_config)
    console = Console()
    try:
        with Progress(
            TextColumn("[bold]language"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("rooms", total=cfg["rooms"])
            run = run_language(cfg, progress=lambda _: bar.advance(task))
    except BootstrapError as exc:
        raise click.ClickException(str(exc)) from None
    except (ValueError, OSError, RuntimeError, EmbedlinkError) as exc:
        raise click.ClickException(f"language side failed: {exc}") from None
    outcomes = run.outcomes
    table = Table(title=f"embedlink language: {len(outcomes)} rooms from {cfg['bootstrap']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for st in Status:
        n = sum(1 for o in outcomes if o.status is st)
        if n:
            table.add_row(f"rooms {st}", str(n))
    nbytes = sum(o.nbytes for o in outcomes)
    lat = np.array([o.latency for o in outcomes]) if outcomes else np.zeros(1)
    table.add_row("rooms that resumed", str(sum(1 for o in outcomes if o.resumes)))
    table.add_row("bytes received", f"{nbytes / 1e9:,.3f} GB")
    table.add_row("throughput", f"{nbytes / max(run.wall, 1e-9) / 1e9:.2f} GB/s")
    table.add_row(
        "latency p50 / p99",
        f"{np.percentile(lat, 50) * 1e3:.1f} / {np.percentile(lat, 99) * 1e3:.1f} ms",
    )
    check = "verified byte for byte" if cfg["hook"] == "synthetic" else f"accepted by {cfg['hook']}"
    table.add_row(check, f"{sum(o.ok for o in outcomes)}/{len(outcomes)}")
    console.print(table)
    for o in outcomes:
        if not o.ok:
            console.print(f"[red]room {o.room}: {o.status}: {o.reason}")
    if not all(o.ok for o in outcomes):
        raise SystemExit(1)


@main.command("vllm-proxy")
@click.option(
    "--encoder",
    "encoders",
    multiple=True,
    required=True,
    help="Base URL of a vLLM encoder instance (ec_producer), e.g. http://10.0.0.1:8001 "
    "(repeatable: round-robin).",
)
@click.option(
    "--prefill",
    "prefills",
    multiple=True,
    required=True,
    help="Base URL of a vLLM prefill/decode instance (ec_consumer) (repeatable: round-robin; "
    "/v1/models and /health go to the first).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on (0: any free one; the line printed at start names it).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds for each encoder call, and for each prefill call's wait for the next byte.",
)
def vllm_proxy(
    encoders: tuple[str, ...], prefills: tuple[str, ...], host: str, port: int, timeout: float
) -> None:
    """Route OpenAI requests to vLLM encoder and prefill instances until
    interrupted (SIGINT or SIGTERM).

    A request with images, audio or video goes to an encoder instance first
    (one output token); the prefill instance then gets the original request
    with the encoder's ec_transfer_params, and its answer (streamed or not)
    goes back to the client. Text-only requests go straight to a prefill
    instance. See the embedlink.integrations.vllm_proxy module for the details.
    """
    from ..integrations.vllm_proxy import check_url, run

    for flag, urls in (("--encoder", encoders), ("--prefill", prefills)):
        for url in urls:
            try:
                check_url(url)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=flag) from None

    def ready(where: str) -> None:
        click.echo(
            f"embedlink vllm proxy on {where} (encoders {', '.join(encoders)}; "
            f"prefill {', '.join(prefills)})"
        )

    try:
        run(encoders, prefills, host=host, port=port, timeout=timeout, on_ready=ready)
    except OSError as exc:
        raise click.ClickException(f"vllm proxy failed to start: {exc}") from None
    click.echo("stopped")


@main.command()
@click.argument("address")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
@click.option("--timeout", default=5.0, show_default=True, help="HTTP timeout in seconds.")
def status(address: str, as_json: bool, timeout: float) -> None:
    """Show what a live process is doing: ADDRESS is host:port of a bootstrap
    server (its ranks, and each rank's status when it serves one) or of an
    endpoint's metrics port (live rooms by status, pool use, peers)."""
    import json

    snap = _fetch_status(address, timeout)
    follow: list[tuple[str, Any]] = []
    if snap.get("side") == "bootstrap":
        for rank in snap.get("ranks", []):
            if rank.get("status_address"):
                try:
                    follow.append(
                        (rank["status_address"], _fetch_status(rank["status_address"], timeout))
                    )
                except click.ClickException as exc:
                    follow.append((rank["status_address"], {"error": exc.message}))
    if as_json:
        click.echo(
            json.dumps({"status": snap, "ranks": dict(follow)} if follow else snap, indent=2)
        )
        return
    console = Console()
    _print_status(console, address, snap)
    for where, sub in follow:
        _print_status(console, where, sub)


def _fetch_status(address: str, timeout: float) -> Any:
    import json
    import urllib.error
    import urllib.request

    url = address if address.startswith("http") else f"http://{address}"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/status", timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise click.ClickException(
            f"{address} answered {exc.code} to GET /status (is it an embedlink bootstrap server "
            "or an endpoint's metrics port?)"
        ) from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot reach {address}: {exc}") from None


def _print_status(console: Console, address: str, snap: Any) -> None:
    if "error" in snap:
        console.print(f"[red]{address}: {snap['error']}")
        return
    side = snap.get("side", "?")
    if side == "bootstrap":
        table = Table(
            title=f"bootstrap server {address}: tp_size {snap.get('tp_size')}, "
            f"dp_size {snap.get('dp_size')}"
        )
        for col in ("role", "rank", "dp group", "control address", "status address"):
            table.add_column(col)
        for r in snap.get("ranks", []):
            table.add_row(
                r["role"],
                str(r["engine_rank"]),
                str(r["dp_group"]),
                r["address"],
                r.get("status_address") or "-",
            )
        console.print(table)
        return
    pool = snap["pool"]
    rooms = snap["rooms"]
    live = sum(v for k, v in rooms.items())
    title = (
        f"{side} rank {snap.get('tp_rank')} at {address}: {live} rooms held; pool "
        f"{pool['blocks_used']}/{pool['blocks_total']} blocks used ({pool['block_size']} tokens each)"
    )
    console.print(title)
    table = Table()
    table.add_column("status")
    table.add_column("rooms", justify="right")
    for name, n in rooms.items():
        table.add_row(name, str(n))
    console.print(table)
    peers = Table(title="peers")
    if side == "encoder":
        for col in ("session", "transport", "alive", "last seen s", "refused"):
            peers.add_column(col)
        for p in snap["peers"]:
            peers.add_row(
                p["session"],
                str(p["transport"]),
                "yes" if p["alive"] else "NO",
                f"{p['last_seen_s']:.1f}",
                p["refused"] or "",
            )
    else:
        for col in ("encoder", "alive", "last seen s"):
            peers.add_column(col)
        for p in snap["peers"]:
            peers.add_row(p["encoder"], "yes" if p["alive"] else "NO", f"{p['last_seen_s']:.1f}")
    console.print(peers)
    console.print("counters: " + ", ".join(f"{k} {v}" for k, v in snap.get("counters", {}).items()))


if __name__ == "__main__":
    main()

"""Memory growth over hot reloads (issue 24; Triton's ``L0_memory_growth`` for its own model loads).

The service in this process (``create_app``, lifespan running, httpx over ASGI: no socket, so the
RSS read is the server's own), then ``--reloads`` reloads through the registry (what the load
request and SIGHUP both call) with no traffic, then as many again while ``/predict`` and
``/gradcam`` requests stream beside them. Each phase records resident memory (``/proc/self/statm``)
before and after (and every 10 reloads) and the functions in torch.jit's global compilation unit,
which a trace per reload used to grow by 47 each (with ~100 MB of executor memory at batch 32).

    flock -x /tmp/camserve-cpu.lock .venv/bin/python bench/reload_memory.py            # shipped bundle
    .venv/bin/python bench/reload_memory.py --reloads 10 --model-dir /tmp/bundle --output /tmp/r.json

Writes ``bench/results/reload_memory.json`` and ``.md``. ``tests/test_reload_memory.py`` runs
:func:`reload_phase` on a test bundle and asserts the growth stays under 60 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the packages, from a plain checkout
sys.path.insert(0, str(REPO / "bench"))

from fixtures import encode, random_image  # noqa: E402
from front_bench import cpu_model  # noqa: E402

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.state import ServiceState  # noqa: E402

RESULTS = REPO / "bench" / "results"
RELOAD_TIMEOUT_S = 300  # one reload on a loaded 2-core machine takes seconds; this only bounds a hang
WARM_UP_ANSWERS = 10  # per stream, before the first reading under traffic
PNG = encode(random_image(5))


def rss_mib() -> float:
    """This process's resident memory, MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def torchscript_functions() -> int:
    return len(torch.jit._state._python_cu.get_functions())


@asynccontextmanager
async def in_process(settings: Settings) -> AsyncIterator[tuple[ServiceState, httpx.AsyncClient]]:
    """The whole service in this process, lifespan running; its state and a client for it."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://camserve", timeout=120) as client,
    ):
        yield app.state.camserve, client


async def _stream(client: httpx.AsyncClient, kind: str, stop: asyncio.Event, statuses: Counter) -> None:
    while not stop.is_set():
        if kind == "predict":
            response = await client.post("/predict", files=[("files", ("a.png", PNG))] * 4)
        else:
            response = await client.post("/gradcam", files=[("files", ("a.png", PNG))])
        statuses[response.status_code] += 1


async def reload_phase(
    state: ServiceState, client: httpx.AsyncClient, reloads: int, traffic: bool, streams: int = 3
) -> dict[str, Any]:
    """``reloads`` reloads, with ``streams`` request streams beside them when ``traffic``: RSS and the
    TorchScript function count before, every 10 reloads and after, and the answers' statuses.

    Under traffic, "before" is read once the streams have been answered a few times (the decode
    threads, batches and Grad-CAM passes have their working set by then) and "after" before they
    stop, so both readings include the same traffic and the difference is what the reloads kept."""
    statuses: Counter = Counter()
    stop = asyncio.Event()
    kinds = ["predict" if i % 3 else "gradcam" for i in range(streams)] if traffic else []
    tasks = [asyncio.create_task(_stream(client, kind, stop, statuses)) for kind in kinds]
    try:
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while sum(statuses.values()) < WARM_UP_ANSWERS * len(tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        started = time.perf_counter()
        before = {"rss_mib": rss_mib(), "torchscript_functions": torchscript_functions()}
        samples = []
        precisions: Counter = Counter()  # with precision auto each reload times the modes again, under this load
        for i in range(1, reloads + 1):
            engine = await asyncio.wait_for(state.registry.reload(), RELOAD_TIMEOUT_S)
            precisions[engine.precision] += 1
            if i % 10 == 0 or i == reloads:
                samples.append({"reloads": i, "rss_mib": round(rss_mib(), 1)})
        after = {"rss_mib": rss_mib(), "torchscript_functions": torchscript_functions()}
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return {
        "traffic": traffic,
        "reloads": reloads,
        "seconds": round(time.perf_counter() - started, 1),
        "before": before,
        "after": after,
        "growth_mib": round(after["rss_mib"] - before["rss_mib"], 1),
        "samples": samples,
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "precisions": dict(precisions),
    }


async def measure(settings: Settings, reloads: int) -> dict[str, Any]:
    async with in_process(settings) as (state, client):
        started = {"rss_mib": rss_mib(), "torchscript_functions": torchscript_functions()}
        quiet = await reload_phase(state, client, reloads, traffic=False)
        loaded = await reload_phase(state, client, reloads, traffic=True)
    return {"started": started, "phases": [quiet, loaded]}


def report(result: dict[str, Any]) -> str:
    lines = [
        "# Memory over hot reloads",
        "",
        f"{result['when']} · {result['cpu']} · {result['cores']} cores · torch {result['torch']} · "
        f"bundle `{result['model_dir']}` · batch {result['max_batch_size']}, precision {result['precision']}"
        + (" · other agents were loading the machine" if result["shared_machine"] else ""),
        "",
        f"Command: `{result['command']}`",
        "",
        f"After start-up: {result['started']['rss_mib']:.0f} MiB, "
        f"{result['started']['torchscript_functions']} TorchScript functions.",
        "",
        "| phase | reloads | seconds | RSS before (MiB) | RSS after (MiB) | growth (MiB) | TorchScript functions "
        "before -> after | precisions chosen | answers |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for phase in result["phases"]:
        answers = ", ".join(f"{n} x {code}" for code, n in phase["statuses"].items()) or "none sent"
        lines.append(
            f"| {'with traffic' if phase['traffic'] else 'no traffic'} | {phase['reloads']} | {phase['seconds']} | "
            f"{phase['before']['rss_mib']:.0f} | {phase['after']['rss_mib']:.0f} | {phase['growth_mib']} | "
            f"{phase['before']['torchscript_functions']} -> {phase['after']['torchscript_functions']} | "
            + ", ".join(f"{n} x {mode}" for mode, n in phase["precisions"].items())
            + f" | {answers} |"
        )
    for phase in result["phases"]:
        samples = ", ".join(f"{s['reloads']}: {s['rss_mib']:.0f}" for s in phase["samples"])
        lines.append(f"\nRSS every 10 reloads ({'with' if phase['traffic'] else 'no'} traffic), MiB: {samples}")
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def _without_note(argv: list[str]) -> list[str]:
    """The command line as recorded: the note is the report's last paragraph, not part of the command."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            kept.append(arg)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "cifar10-resnet")
    parser.add_argument("--reloads", type=int, default=50, help="per phase")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--shared-machine", action="store_true", help="say so in the results")
    parser.add_argument("--note", default="", help="a paragraph for the report")
    parser.add_argument("--output", type=Path, default=RESULTS / "reload_memory.json")
    args = parser.parse_args()
    settings = Settings(
        model_dir=args.model_dir, max_batch_size=args.max_batch_size, precision=args.precision, log_requests=False
    )
    measured = asyncio.run(measure(settings, args.reloads))
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "command": " ".join([".venv/bin/python", "bench/reload_memory.py", *_without_note(sys.argv[1:])]),
        "model_dir": str(args.model_dir),
        "max_batch_size": args.max_batch_size,
        "precision": args.precision,
        "shared_machine": args.shared_machine,
        "note": args.note,
        **measured,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    markdown = report(result)
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()

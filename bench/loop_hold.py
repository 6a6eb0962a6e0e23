"""How long one hostile request holds the event loop (issue 24): the longest gap a 1 ms ticker sees.

Each body is sent once to an in-process app (null engine, default limits) through httpx's ASGI
transport while a ticker coroutine on the same loop sleeps 1 ms at a time; the longest gap between
two ticks is the longest the loop could not run anything else: parsing on the loop, or a thread
holding the GIL in one C call (``json.loads``). Also: a chunked request's trailer and a
Content-Disposition of 15,000 ``;`` fed to the connection and the raw-body reader directly, timed
on the CPU (``time.thread_time``).

    python bench/loop_hold.py [--label NAME] [--repeats 5] [--trailer-mib 16] [--out bench/results/loop_hold_NAME.json]

Run from a tree's root (it imports that tree's ``service``), e.g. this branch and a checkout of main.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from fixtures import make_bundle  # noqa: E402
from front_bench import cpu_model  # noqa: E402

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402

MODEL = "test-bundle"


def oip_bodies() -> dict[str, tuple[bytes, dict[str, str]]]:
    """The issue's bodies (all under the default 16 MiB body limit) and two more."""
    empty_elements = b"\0\0\0\0" * 4_000_000
    head = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 16_000_000}}
            ]
        }
    ).encode()

    def image_data(data: bytes) -> bytes:
        return b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ' + data + b"}]}"

    pixels = b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": ['
    return {
        "BYTES tensor, 4M empty elements (16 MB)": (
            head + empty_elements,
            {"Inference-Header-Content-Length": str(len(head))},
        ),
        "JSON, 5.4M empty arrays (16.2 MB)": (image_data(b"[" + b"[]," * 5_400_000 + b"[]]"), {}),
        "JSON, 5M pixel values (10 MB)": (pixels + b"0," * 4_999_999 + b"0]}]}", {}),
        "JSON nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, {}),
        "JSON, 16 images of pixels (valid, 200)": (
            b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [16, 32, 32, 3], "data": ['
            + b"7," * (16 * 3072 - 1)
            + b"7]}]}",
            {},
        ),
        "JSON, one image of pixels (valid, 200)": (pixels + b"7," * 3071 + b"7]}]}", {}),
    }


async def ticker(gaps: list[float], stop: asyncio.Event) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


async def loop_hold(app: Any, body: bytes, headers: dict[str, str]) -> tuple[float, int, float]:
    """(longest tick gap s, status, request wall s)."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a 500 is a figure too
    async with httpx.AsyncClient(transport=transport, base_url="http://camserve", timeout=120) as client:
        gaps: list[float] = []
        stop = asyncio.Event()
        task = asyncio.create_task(ticker(gaps, stop))
        await asyncio.sleep(0.02)
        gaps.clear()
        started = time.perf_counter()
        response = await client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
        wall = time.perf_counter() - started
        stop.set()
        await task
    return max(gaps, default=0.0), response.status_code, wall


def trailer_cpu(mib: int) -> tuple[float, bytes]:
    """CPU seconds to feed a chunked request with a ``mib`` MiB trailer to the bounded protocol, in 64 KiB reads."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from service.http.connection import BoundedHttpToolsProtocol

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.written, self.closed = bytearray(), False

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

        def write(self, data: bytes) -> None:
            self.written += data

        def close(self) -> None:
            self.closed = True

        def is_closing(self) -> bool:
            return self.closed

        def pause_reading(self) -> None: ...

        def resume_reading(self) -> None: ...

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()

    async def run() -> tuple[float, bytes]:
        config = Config(app=app, lifespan="off", log_level="warning")
        protocol = BoundedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        transport = Transport()
        protocol.connection_made(transport)
        protocol.data_received(
            b"POST /livez HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-T: "
        )
        piece = b"a" * 65536
        started = time.thread_time()
        for _ in range(mib * 16):
            if transport.closed:
                break
            protocol.data_received(piece)
        spent = time.thread_time() - started
        protocol._disarm()
        return spent, bytes(transport.written[:12])

    return asyncio.run(run())


def disposition_cpu() -> float:
    from service.http.raw_body import _filename

    request = SimpleNamespace(headers={"content-disposition": "inline; filename=" + ";" * 15_000})
    started = time.thread_time()
    for _ in range(5):
        _filename(request)
    return (time.thread_time() - started) / 5


async def measure(bundle_dir: Path, repeats: int) -> dict[str, Any]:
    app = create_app(Settings(model_dir=bundle_dir, engine="null", log_requests=False))
    rows = []
    async with app.router.lifespan_context(app):
        bodies = oip_bodies()
        await loop_hold(app, *bodies["JSON, one image of pixels (valid, 200)"])  # the app's first request builds it
        for name, (body, headers) in bodies.items():
            runs = [await loop_hold(app, body, headers) for _ in range(repeats)]
            holds = sorted(hold * 1000 for hold, _, _ in runs)
            walls = sorted(wall * 1000 for _, _, wall in runs)
            status = runs[0][1]
            rows.append({"body": name, "bytes": len(body), "status": status, "loop_hold_ms": holds, "wall_ms": walls})
            median, worst = statistics.median(holds), holds[-1]
            print(f"{name:45s} {status}  loop held {median:8.1f} ms median, {worst:8.1f} max of {repeats}", flush=True)
    return {"oip": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default=ROOT.name)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--trailer-mib", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(measure(make_bundle(Path(tmp) / "bundle"), args.repeats))
    spent, answer = trailer_cpu(args.trailer_mib)
    print(f"trailer of {args.trailer_mib} MiB: {spent:.3f} s CPU, answered {answer!r}")
    disposition = disposition_cpu()
    print(f"Content-Disposition of 15,000 ';': {disposition * 1000:.2f} ms CPU")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    result.update(
        label=args.label,
        commit=commit.strip(),
        cpu=cpu_model(),
        load_average=Path("/proc/loadavg").read_text().split()[:3],
        trailer={"mib": args.trailer_mib, "cpu_s": spent, "answer": answer.decode("latin-1")},
        disposition_15000_semicolons_cpu_ms=disposition * 1000,
        command=" ".join(["python", *sys.argv]),
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

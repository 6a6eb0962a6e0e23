"""The figures behind issue 14's bounds (bench/results/bounds.md): decode memory, and the HTTP front's cost.

    python bench/bounds.py calibrate          # each kind of image: estimated vs measured decode peak
    python bench/bounds.py memory [--tree DIR] # server RSS before, at the peak of, and after decode bursts
    python bench/bounds.py http --tree A=DIR --tree B=DIR  # hey, c=32, single-image /predict, interleaved
    python bench/bounds.py allocator --mode none|trim|mmap4  # in process: what glibc keeps after decodes

``calibrate`` decodes one image per fresh process and compares :func:`service.images.probe_image`'s
``peak_bytes`` with the process's measured peak (``ru_maxrss`` over the RSS before the decode).
``memory`` starts ``python -m service`` from each tree (``--variant no-trim`` runs this tree's server
with ``malloc_trim`` disabled, to show what it fixes), samples its RSS every 20 ms through a burst of
concurrent uploads, and again 5 s after. ``http`` runs every tree's server at once and measures them in
turn, round after round, so drift in the machine's speed hits all alike; run it under
``flock -x /tmp/camserve-cpu.lock``. Each writes ``bench/results/bounds_<part>.json`` and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Server, camserve, machine_info, multipart_body, request, require_hey, rss_bytes, run_hey
from serve_bench import load_images

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL_DIR = ROOT / "models" / "cifar10-resnet"
PYTHON = sys.executable
NO_TRIM = "import service.decoding.budget as d; d._LIBC = None; from service.__main__ import main; main()"
H11 = (
    "import service.http.connection as p; bounds = p.uvicorn_bounds; "
    "p.uvicorn_bounds = lambda s: {**bounds(s), 'http': 'h11', 'h11_max_incomplete_event_size': s.max_header_bytes}; "
    "from service.__main__ import main; main()"
)


# -- images -------------------------------------------------------------------------------------
def gradient(kind: str, width: int, height: int) -> bytes:
    """A smooth image of the given kind: tiny files that decode to many pixels, as a bomb does."""
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    g = ((x + y) / 2).astype(np.uint8)
    rgb = np.dstack([g, g, 255 - g])
    rgba = np.dstack([g, g, 255 - g, g])
    image, fmt, options = {
        "webp_rgba": (Image.fromarray(rgba, "RGBA"), "WEBP", {"lossless": True}),
        "png_rgba": (Image.fromarray(rgba, "RGBA"), "PNG", {}),
        "png_rgb": (Image.fromarray(rgb, "RGB"), "PNG", {}),
        "png_l": (Image.fromarray(g, "L"), "PNG", {}),
        "png_16": (Image.fromarray(g.astype(np.uint16) * 257), "PNG", {}),
        "png_p": (Image.fromarray(g, "L").convert("P"), "PNG", {}),
        "gif": (Image.fromarray(rgb, "RGB").convert("P"), "GIF", {}),
        "bmp": (Image.fromarray(rgb, "RGB"), "BMP", {}),
        "jpeg": (Image.fromarray(rgb, "RGB"), "JPEG", {"quality": 90}),
        "jpeg_progressive": (Image.fromarray(rgb, "RGB"), "JPEG", {"quality": 90, "progressive": True}),
    }[kind]
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# -- calibrate ------------------------------------------------------------------------------------
def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_one(path: Path) -> dict:
    """In a fresh process: probe, then decode once after a warm-up, and report the decode's peak."""
    from service.decoding.probe import decode_image, decode_probed, probe_image

    for mode, fmt in (("RGB", "JPEG"), ("RGBA", "PNG")):  # first-use costs (torch, codecs) out of the figure
        warm = io.BytesIO()
        Image.new(mode, (300, 300)).save(warm, fmt)
        decode_image(warm.getvalue(), "warm", max_pixels=10**9)
    probe = probe_image(path.read_bytes(), path.name, max_pixels=10**9)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = rss_bytes()
    started = time.perf_counter()
    decode_probed(probe)
    seconds = time.perf_counter() - started
    peak = _peak_rss_bytes() - before
    return {
        "decoded_bytes": probe.decoded_bytes,
        "estimated_peak": probe.peak_bytes,
        "measured_peak": peak,
        "s": seconds,
    }


def calibrate(args: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            width, height = (2000, 2000) if kind == "bmp" else (4000, 3000) if kind.startswith("jpeg") else (4000, 4000)
            path = Path(tmp) / f"{kind}.img"
            path.write_bytes(gradient(kind, width, height))
            done = subprocess.run(
                [PYTHON, __file__, "_measure_one", str(path)], cwd=ROOT, capture_output=True, text=True, check=True
            )
            row = {"kind": kind, "size": f"{width}x{height}", "file_bytes": path.stat().st_size}
            rows.append({**row, **json.loads(done.stdout)})
    print("| kind | pixels | file KiB | decoded MiB | estimated peak MiB | measured peak MiB | decode s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['size']} | {r['file_bytes'] / 1024:.0f} | {r['decoded_bytes'] / 2**20:.1f} | "
            f"{r['estimated_peak'] / 2**20:.1f} | {r['measured_peak'] / 2**20:.1f} | {r['s']:.2f} |"
        )
    return {"rows": rows}


# -- memory ---------------------------------------------------------------------------------------
def server(
    tree: Path, workdir: Path, name: str, code: str | None = None, **settings: str
) -> contextlib.AbstractContextManager[Server]:
    """``python -m service`` from ``tree`` (or ``python -c code`` there: a patched service) on the shipped bundle."""
    command = [PYTHON, "-c", code] if code else None
    log = workdir / f"{name}.log"
    return camserve(MODEL_DIR, log, name=name, tree=tree, command=command, log_requests="false", **settings)


def post(url: str, files: list[tuple[str, bytes]], timeout: float = 120) -> int:
    """One multipart POST (parts without a Content-Type); its status."""
    body = multipart_body(files, boundary="camservebounds", part_type=None)
    return request("POST", url, body, timeout=timeout)[0]


def burst(base: str, pid: int, files: list[tuple[str, bytes]], clients: int, settle_s: float) -> dict:
    """RSS before, at the peak of (sampled every 20 ms) and ``settle_s`` after ``clients`` concurrent uploads."""
    post(f"{base}/predict", [("warm.png", gradient("png_rgb", 32, 32))])
    time.sleep(1.0)
    before = rss_bytes(pid)
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(lambda _: post(f"{base}/predict", files), range(clients)))
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    after_1s = (time.sleep(1.0), rss_bytes(pid))[1]
    time.sleep(max(0.0, settle_s - 1.0))
    after = rss_bytes(pid)
    codes: dict[str, int] = {}
    for status in statuses:
        codes[str(status)] = codes.get(str(status), 0) + 1
    return {
        "rss_before_mib": before / 2**20,
        "rss_peak_mib": peak / 2**20,
        "rss_after_1s_mib": after_1s / 2**20,
        f"rss_after_{settle_s:g}s_mib": after / 2**20,
        "burst_s": seconds,
        "statuses": codes,
    }


BURSTS = {
    # The issue's: six concurrent requests, each one PNG of 5000x5000 RGBA (over the per-image limit here).
    "bomb": ("png_rgba", 5000, 5000, 1, 6),
    # The biggest an honest client may send by default: 4000x3000 RGBA (45.8 MiB decoded), 4 per request,
    # 16 requests at once: 64 decodes of about 96 MiB peak each.
    "allowed": ("png_rgba", 4000, 3000, 4, 16),
    # The same in WebP (libwebp's canvases: about 4x the decoded size at the peak).
    "allowed_webp": ("webp_rgba", 4000, 3000, 4, 16),
}


def memory(args: argparse.Namespace) -> dict:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for target in args.tree:
            name, _, tree = target.partition("=")
            code = {"no-trim": NO_TRIM}.get(args.variant) if name == "branch" else None
            for burst_name in args.bursts:
                kind, width, height, per_request, clients = BURSTS[burst_name]
                image = gradient(kind, width, height)
                files = [(f"{burst_name}{i}.{kind.split('_')[0]}", image) for i in range(per_request)]
                settings = dict(pair.split("=", 1) for pair in args.set)
                with server(Path(tree), workdir, name, code, **settings) as running:
                    row = burst(running.base_url, running.pid, files, clients, args.settle)
                row = {
                    "tree": name,
                    "variant": args.variant if code else "",
                    "settings": settings,
                    "burst": burst_name,
                    **row,
                }
                print(json.dumps(row), flush=True)
                results.append(row)
    return {"rows": results, "bursts": {k: BURSTS[k] for k in args.bursts}}


# -- allocator ------------------------------------------------------------------------------------
def allocator(args: argparse.Namespace) -> dict:
    """In a fresh process: 16 decodes of a 4000x3000 RGBA image on 4 threads; RSS peak and after.

    ``none``: glibc as it is; ``trim``: ``malloc_trim(0)`` once after; ``mmap4``: the mmap threshold
    fixed at 4 MiB (``mallopt``) before, so every big buffer is its own mmap.
    """
    done = subprocess.run(
        [PYTHON, __file__, "_allocator_one", args.mode, args.kind], cwd=ROOT, capture_output=True, text=True, check=True
    )
    row = json.loads(done.stdout)
    print(json.dumps(row))
    return {"rows": [row]}


def allocator_one(mode: str, kind: str) -> dict:
    import ctypes

    from service.decoding.probe import decode_image

    libc = ctypes.CDLL("libc.so.6")
    if mode == "mmap4":
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    data = gradient(kind, 4000, 3000)
    decode_image(gradient("png_rgba", 300, 300), "warm", max_pixels=10**9)
    before = rss_bytes()
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: decode_image(data, f"{i}", max_pixels=10**9), range(16)))
    stop.set()
    sampler.join()
    after = rss_bytes()
    trim_s = None
    if mode == "trim":
        started = time.perf_counter()
        libc.malloc_trim(0)
        trim_s = time.perf_counter() - started
    return {
        "mode": mode,
        "kind": kind,
        "peak_mib": (peak - before) / 2**20,
        "after_mib": (after - before) / 2**20,
        "after_trim_mib": (rss_bytes() - before) / 2**20,
        "trim_s": trim_s,
    }


# -- http -----------------------------------------------------------------------------------------
def http(args: argparse.Namespace) -> dict:
    hey = require_hey("hey")
    targets = [t.partition("=") for t in args.tree]
    images = load_images(MODEL_DIR / "misclassified")[:1]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        body = multipart_body(images, workdir / "one.multipart")
        bases = {}
        for name, _, tree in targets:
            code = H11 if name.endswith("h11") else None
            bases[name] = stack.enter_context(server(Path(tree), workdir, name, code, tta="none")).base_url
        for round_index in range(args.rounds):
            for name in bases:
                url = f"{bases[name]}/predict"
                run_hey(hey, url, body, concurrency=args.concurrency, seconds=args.warmup)
                parsed = run_hey(hey, url, body, concurrency=args.concurrency, seconds=args.duration)
                ok = parsed["status_codes"].get("200", 0)
                row = {
                    "target": name,
                    "round": round_index,
                    "requests_per_s": ok / parsed["total_s"],
                    "p50_ms": parsed["percentiles_s"].get(50, 0) * 1000,
                    "p99_ms": parsed["percentiles_s"].get(99, 0) * 1000,
                    "status_codes": parsed["status_codes"],
                    "errors": parsed["errors"],
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    summary = {}
    for name in bases:
        values = sorted(r["requests_per_s"] for r in rows if r["target"] == name)
        summary[name] = {"median_requests_per_s": values[len(values) // 2], "all": values}
    print("| target | median requests/s | rounds |")
    print("|---|---:|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['median_requests_per_s']:.1f} | {', '.join(f'{v:.1f}' for v in s['all'])} |")
    return {"rows": rows, "summary": summary, "concurrency": args.concurrency, "duration_s": args.duration}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    cal = sub.add_parser("calibrate")
    cal.add_argument(
        "--kinds",
        nargs="+",
        default=[
            *("webp_rgba", "png_rgba", "png_rgb", "png_l", "png_16", "png_p"),
            "gif",
            "bmp",
            "jpeg",
            "jpeg_progressive",
        ],
    )
    mem = sub.add_parser("memory")
    mem.add_argument("--tree", action="append", default=None, help="NAME=DIR (default: branch=this tree)")
    mem.add_argument("--variant", choices=["default", "no-trim"], default="default", help="for the tree named 'branch'")
    mem.add_argument("--bursts", nargs="+", default=list(BURSTS), choices=list(BURSTS))
    mem.add_argument("--settle", type=float, default=5.0, help="seconds after the burst for the last RSS")
    mem.add_argument("--set", action="append", default=[], help="KEY=VALUE: a CAMSERVE_ setting for the servers")
    mem.add_argument("--label", default="", help="suffix of the results file")
    web = sub.add_parser("http")
    web.add_argument("--tree", action="append", required=True, help="NAME=DIR; a NAME ending in h11 runs uvicorn's h11")
    web.add_argument("--rounds", type=int, default=3)
    web.add_argument("--duration", type=float, default=8.0)
    web.add_argument("--warmup", type=float, default=2.0)
    web.add_argument("--concurrency", type=int, default=32)
    sub.add_parser("_measure_one").add_argument("path", type=Path)
    alloc = sub.add_parser("allocator")
    alloc.add_argument("--mode", choices=["none", "trim", "mmap4"], default="none")
    alloc.add_argument("--kind", default="png_rgba", choices=["png_rgba", "webp_rgba"])
    one = sub.add_parser("_allocator_one")
    one.add_argument("mode")
    one.add_argument("kind")
    args = parser.parse_args(argv)
    if args.part == "_measure_one":
        print(json.dumps(measure_one(args.path)))
        return
    if args.part == "_allocator_one":
        print(json.dumps(allocator_one(args.mode, args.kind)))
        return
    if args.part == "memory" and not args.tree:
        args.tree = [f"branch={ROOT}"]
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result = {"part": args.part, "args": vars(args) | {"func": None}, "started": started, "machine": machine_info()}
    result |= {"calibrate": calibrate, "memory": memory, "http": http, "allocator": allocator}[args.part](args)
    suffix = ""
    if args.part == "memory":
        suffix = "".join(f"_{part}" for part in (args.variant, args.label) if part and part != "default")
    if args.part == "allocator":
        suffix = f"_{args.kind}_{args.mode}"
    out = RESULTS / f"bounds_{args.part}{suffix}.json"
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

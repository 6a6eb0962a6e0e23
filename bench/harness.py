"""The test and bench kit: the one way the benchmarks and the tests start, stop, load and read servers.

* servers: :func:`camserve` starts ``python -m service`` (or another launcher of it, from any
  checkout) on a port the kernel picks, waits for ``/readyz`` (and for every worker) within a
  deadline, captures its output in a log file and always stops it; :func:`serving` does the same
  for any server command (the LitServe peer, bare ASGI apps); :func:`run_camserve` runs one that is
  expected to exit (a refused start). A server runs in its own session, so SIGTERM reaches every
  process it forked and nothing else.
* load: :func:`run_hey` drives a server with ``hey`` (Debian's Go load generator: a Python client
  saturates two cores long before the server does) and :func:`parse_hey` reads its summary.
* bodies and answers: :func:`multipart_body` builds the ``multipart/form-data`` bodies that hey, raw
  sockets and ``urllib`` send; :func:`request` is a plain stdlib request; :func:`scrape` and
  :func:`metric` read ``/metrics`` with prometheus-client's own parser.
* waiting: :func:`wait_until` and :func:`wait_until_async`, always with a deadline.
* the machine: :func:`cpu_model`, :func:`machine_info`, and the ``/proc`` readers the benchmarks
  measure processes with (:func:`process_cpu_seconds`, :func:`server_pids`, :func:`rss_bytes`).

Nothing here imports the tests; the tests import this (``bench/`` is put on ``sys.path`` by
``tests/conftest.py``), along with :mod:`fixtures` for the bundles and images both make.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEY_REQUEST_TIMEOUT_S = 20  # hey's own per-request limit; a run can never outlast duration + this
DEFAULT_START_TIMEOUT_S = 300.0  # camserve's start-up includes its precision timing and warm-up
STOP_GRACE_S = 30.0  # camserve drains for up to its request timeout (30 s by default) on SIGTERM
TICKS = os.sysconf("SC_CLK_TCK")


# -- waiting ---------------------------------------------------------------------------------------
def wait_until(
    condition: Callable[[], object], timeout_s: float = 60.0, *, interval_s: float = 0.05, what: str = "condition"
) -> None:
    """Until ``condition()`` is true; past ``timeout_s`` raise, so that no wait can hang a run."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout_s:g} s")
        time.sleep(interval_s)


async def wait_until_async(
    condition: Callable[[], object], timeout_s: float = 60.0, *, interval_s: float = 0.01, what: str = "condition"
) -> None:
    """:func:`wait_until` for a coroutine: sleeps on the event loop, so the tasks it waits for run."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout_s:g} s")
        await asyncio.sleep(interval_s)


# -- ports, bodies and plain requests --------------------------------------------------------------
def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Body:
    """A request body; ``path`` holds the same bytes on disk for ``hey -D``."""

    data: bytes
    content_type: str
    images: int
    path: Path | None = None


def multipart_body(
    files: list[tuple[str, bytes]],
    path: Path | None = None,
    *,
    field: str = "files",
    boundary: str | None = None,
    part_type: str | None = "image/png",
) -> Body:
    """A multipart/form-data body with every file under ``field``, as browsers send it (``part_type``
    None: parts without a Content-Type, as some clients send them); written to ``path`` too when given."""
    boundary = boundary or f"camserve{secrets.token_hex(8)}"
    type_line = f"Content-Type: {part_type}\r\n" if part_type else ""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n{type_line}\r\n'.encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    data = b"".join(parts) + f"--{boundary}--\r\n".encode()
    if path is not None:
        path.write_bytes(data)
    return Body(data, f"multipart/form-data; boundary={boundary}", len(files), path)


def raw_body(data: bytes, content_type: str, path: Path | None = None) -> Body:
    """One image as the whole body (``Content-Type: image/*``); written to ``path`` too when given."""
    if path is not None:
        path.write_bytes(data)
    return Body(data, content_type, 1, path)


def request(method: str, url: str, body: Body | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
    """A plain stdlib request (status, body), for readiness, /health and one-off checks: no client
    library in the benchmark's own process."""
    headers = {"Content-Type": body.content_type} if body else {}
    prepared = urllib.request.Request(url, data=body.data if body else None, headers=headers, method=method)
    try:
        with urllib.request.urlopen(prepared, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- /metrics --------------------------------------------------------------------------------------
Samples = dict[tuple[str, frozenset], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus' text format, parsed by prometheus-client itself: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(base_url: str, timeout: float = 10.0) -> Samples:
    """One /metrics scrape of a running server, parsed (:func:`parse_metrics`)."""
    status, text = request("GET", f"{base_url}/metrics", timeout=timeout)
    if status != 200:
        raise RuntimeError(f"{base_url}/metrics answered {status}")
    return parse_metrics(text.decode())


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there are none): every
    worker's share of a multiprocess metric, or one labelled series."""
    wanted = set(labels.items())
    return sum(value for (sample, got), value in samples.items() if sample == name and wanted <= got)


# -- servers ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Server:
    name: str
    base_url: str
    log_path: Path
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.base_url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _answers_200(url: str) -> bool:
    with contextlib.suppress(OSError, http.client.HTTPException):
        return request("GET", url, timeout=2)[0] == 200
    return False


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_ready(process: subprocess.Popen, ready: Callable[[], bool], log_path: Path, timeout_s: float) -> None:
    """Until ``ready()``; a server that exits or never gets there raises with its log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_tail(log_path)}")
        if ready():
            return
        time.sleep(0.2)
    raise TimeoutError(f"server not ready within {timeout_s:.0f} s:\n{log_tail(log_path)}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the server's whole process group, SIGKILL whatever is left after ``grace_s``."""
    pgid = process.pid  # start_new_session=True made the server its group's leader
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        process.poll()  # reap the leader, so a zombie does not keep the group "alive"
        if not _group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def server_env(*, inherit_settings: bool = True) -> dict[str, str]:
    """The caller's environment minus an API key (a server under load or test is not an auth test
    unless it asks for one), or minus every ``CAMSERVE_*`` setting (``inherit_settings=False``: the
    service's own defaults), with unbuffered output so a failing server's log shows why."""
    drop = (lambda key: key == "CAMSERVE_API_KEY") if inherit_settings else (lambda key: key.startswith("CAMSERVE_"))
    return {**{key: value for key, value in os.environ.items() if not drop(key)}, "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def serving(
    name: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    log_path: Path,
    *,
    cwd: Path = ROOT,
    ready_path: str | None = "/readyz",
    ready: Callable[[str], bool] | None = None,
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    stop_grace_s: float = STOP_GRACE_S,
    quiet: bool = True,
) -> Iterator[Server]:
    """Start ``command`` in its own session with its output in ``log_path``, wait until ``ready_path``
    answers 200 (None: until the port accepts connections) and ``ready(base_url)`` holds, always stop it."""
    base_url = f"http://127.0.0.1:{port}"
    if not quiet:
        print(f"[{name}] starting: {shlex.join(command)}", flush=True)

    def is_ready() -> bool:
        up = _answers_200(base_url + ready_path) if ready_path is not None else _listening(port)
        return up and (ready is None or ready(base_url))

    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_ready(process, is_ready, log_path, start_timeout_s)
            yield Server(name, base_url, log_path, process)
        finally:
            stop_group(process, stop_grace_s)
            if not quiet:
                print(f"[{name}] stopped", flush=True)


def workers_ready(base_url: str) -> int:
    """How many of the service's workers ``/health`` reports ready (0 while it cannot say)."""
    with contextlib.suppress(OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
        status, body = request("GET", f"{base_url}/health", timeout=5)
        if status == 200:
            return int(json.loads(body)["workers"]["ready"])
    return 0


def camserve_env(model_dir: Path | None, port: int, *, inherit_settings: bool = True, **settings: object) -> dict:
    """The environment of a camserve process: ``CAMSERVE_*`` overrides given as keyword arguments
    (``max_batch_size=1``); ``model_dir`` None leaves the service's default bundle."""
    env = {
        **server_env(inherit_settings=inherit_settings),
        "CAMSERVE_HOST": "127.0.0.1",
        "CAMSERVE_PORT": str(port),
        "CAMSERVE_GRPC_PORT": "0",  # off: see camserve()
    }
    if model_dir is not None:
        env["CAMSERVE_MODEL_DIR"] = str(model_dir)
    return env | {f"CAMSERVE_{key.upper()}": str(value) for key, value in settings.items()}


def camserve(
    model_dir: Path | None,
    log_path: Path,
    *,
    name: str = "camserve",
    tree: Path = ROOT,
    command: list[str] | None = None,
    inherit_settings: bool = True,
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    quiet: bool = True,
    **settings: str | int | float,
) -> contextlib.AbstractContextManager[Server]:
    """``python -m service`` from ``tree`` (any checkout; ``command`` replaces the launcher, e.g. a
    ``python -c`` that patches the service first) on a free loopback port serving ``model_dir``, with
    ``CAMSERVE_*`` overrides as keyword arguments; ready once ``/readyz`` answers and, with
    ``workers=N``, once ``/health`` counts N workers ready. gRPC is off unless asked for
    (``grpc_port=free_port()``): servers on one machine must not share the default port 8001."""
    port = free_port()
    env = camserve_env(model_dir, port, inherit_settings=inherit_settings, **settings)
    workers = str(settings.get("workers", "1"))
    ready = (lambda base: workers_ready(base) >= int(workers)) if workers.isdigit() and int(workers) > 1 else None
    return serving(
        name,
        command or [sys.executable, "-m", "service"],
        env,
        port,
        log_path,
        cwd=tree,
        ready=ready,
        start_timeout_s=start_timeout_s,
        quiet=quiet,
    )


def run_camserve(
    model_dir: Path | None, *, timeout_s: float = 120.0, **settings: str | int | float
) -> subprocess.CompletedProcess[str]:
    """``python -m service`` run to its end (a start that must be refused), none of the caller's
    ``CAMSERVE_*`` settings inherited; its exit status and output. Port 0: it never serves."""
    env = camserve_env(model_dir, 0, inherit_settings=False, **settings)
    command = [sys.executable, "-m", "service"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)


# -- hey -------------------------------------------------------------------------------------------
def find_hey(name: str = "hey") -> str | None:
    return shutil.which(name)


def require_hey(name: str = "hey") -> str:
    """The load generator is not a Python package, so say exactly how to get it."""
    path = find_hey(name)
    if path is None:
        sys.exit(f"`{name}` not found on PATH; install it with `apt-get install -y hey` (Debian)")
    return path


def run_hey(
    hey: str,
    url: str,
    body: Body,
    *,
    concurrency: int,
    seconds: float,
    rate: float | None = None,
    request_timeout_s: float = HEY_REQUEST_TIMEOUT_S,
) -> dict:
    """One bounded POST run, parsed: -z stops issuing at ``seconds``, -t caps every request, and a
    subprocess timeout caps hey itself. ``rate`` is requests/s for all workers together (hey's -q
    is per worker)."""
    if body.path is None:
        raise ValueError("hey sends the body from a file: build it with multipart_body(..., path)")
    command = [hey, "-z", f"{seconds:g}s", "-c", str(concurrency), "-t", f"{request_timeout_s:g}"]
    if rate is not None:
        command += ["-q", f"{rate / concurrency:g}"]
    command += ["-m", "POST", "-T", body.content_type, "-D", str(body.path), url]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + request_timeout_s + 30, check=False
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"hey did not finish in time: {shlex.join(command)}") from None
    if done.returncode != 0:
        raise RuntimeError(f"hey failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return parse_hey(done.stdout)


def parse_hey(text: str) -> dict:
    """hey's text summary -> seconds, requests/s, latency percentiles, status codes, errors.

    The summary rather than ``-o csv``: the CSV leaves out requests that failed below HTTP, and a
    load test must count those (``errors``: (count, message) pairs).
    """

    def number(pattern: str) -> float | None:
        match = re.search(pattern, text)
        return float(match.group(1)) if match else None

    summary, _, error_part = text.partition("Error distribution:")
    status_part = summary.partition("Status code distribution:")[2]
    percentiles = {int(p): float(s) for p, s in re.findall(r"^\s*(\d+)%+ in ([\d.]+) secs", summary, re.M)}
    errors = [(int(n), message.strip()) for n, message in re.findall(r"^\s*\[(\d+)\]\s+(.+)$", error_part, re.M)]
    return {
        "total_s": number(r"Total:\s+([\d.]+) secs"),
        "slowest_s": number(r"Slowest:\s+([\d.]+) secs"),
        "average_s": number(r"Average:\s+([\d.]+) secs"),
        "requests_per_s": number(r"Requests/sec:\s+([\d.]+)"),
        "percentiles_s": percentiles,
        "status_codes": {code: int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", status_part)},
        "errors": errors,
    }


# -- the machine and its processes -----------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (x86's "model name", some ARM kernels' "cpu model")."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict:
    """Enough to tell two result files apart: CPU, cores, versions, and how busy the box was."""
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
        "niceness": os.nice(0),
    }


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, all its threads (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    cpu = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = cpu[3] + cpu[4]  # idle + iowait
    steal = cpu[7] if len(cpu) > 7 else 0
    return (sum(cpu[:8]) - idle - steal) / TICKS, steal / TICKS


def server_pids(root: int) -> list[int]:
    """The started process and its descendants (uvicorn's workers; not multiprocessing's tracker)."""
    pids, frontier = [root], [root]
    while frontier:
        pid = frontier.pop()
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                pids.append(int(child))
                frontier.append(int(child))
    return pids


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size from /proc (no psutil needed): what the kernel charges the process for."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"process {pid} has no VmRSS")

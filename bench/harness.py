"""Launching and loading servers: the one way the benchmarks and the tests start, stop and load them.

* :func:`camserve` starts ``python -m service`` on a free loopback port, waits for ``/readyz`` and
  always stops it; :func:`serving` does the same for any server command (the LitServe peer).
  A server runs in its own session, so SIGTERM reaches every process it forked and nothing else.
* :func:`run_hey` drives a server with ``hey`` (Debian's Go load generator: a Python client
  saturates two cores long before the server does) and :func:`parse_hey` reads its summary.
* :func:`multipart_body` builds the ``multipart/form-data`` bodies that hey, raw sockets and
  ``urllib`` send.

Nothing here imports the tests; the tests import this (``bench/`` is put on ``sys.path`` by
``tests/conftest.py``), along with :mod:`fixtures` for the bundles and images both make.
"""

from __future__ import annotations

import contextlib
import http.client
import os
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEY_REQUEST_TIMEOUT_S = 20  # hey's own per-request limit; a run can never outlast duration + this
DEFAULT_START_TIMEOUT_S = 300.0  # camserve's start-up includes its precision timing and warm-up
STOP_GRACE_S = 30.0  # camserve drains for up to its request timeout (30 s by default) on SIGTERM


# -- ports and plain requests ------------------------------------------------------------------------
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
    part_type: str = "image/png",
) -> Body:
    """A multipart/form-data body with every file under ``field``, as browsers send it; written to
    ``path`` too when given."""
    boundary = boundary or f"camserve{secrets.token_hex(8)}"
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: {part_type}\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    data = b"".join(parts) + f"--{boundary}--\r\n".encode()
    if path is not None:
        path.write_bytes(data)
    return Body(data, f"multipart/form-data; boundary={boundary}", len(files), path)


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


def wait_ready(process: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    """Until ``url`` answers 200; a server that exits or never gets there raises with its log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_tail(log_path)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if request("GET", url, timeout=2)[0] == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not 200 within {timeout_s:.0f} s:\n{log_tail(log_path)}")


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


def server_env() -> dict[str, str]:
    """The caller's environment minus an API key (a server under load or test is not an auth test
    unless it asks for one), with unbuffered output so a failing server's log shows why."""
    env = {key: value for key, value in os.environ.items() if key != "CAMSERVE_API_KEY"}
    return {**env, "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def serving(
    name: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    log_path: Path,
    *,
    ready_path: str = "/readyz",
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    stop_grace_s: float = STOP_GRACE_S,
    quiet: bool = True,
) -> Iterator[Server]:
    """Start ``command`` in its own session, wait until ``ready_path`` answers 200, always stop it."""
    base_url = f"http://127.0.0.1:{port}"
    if not quiet:
        print(f"[{name}] starting: {shlex.join(command)}", flush=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_ready(process, base_url + ready_path, log_path, start_timeout_s)
            yield Server(name, base_url, log_path, process)
        finally:
            stop_group(process, stop_grace_s)
            if not quiet:
                print(f"[{name}] stopped", flush=True)


def camserve(
    model_dir: Path,
    log_path: Path,
    *,
    name: str = "camserve",
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    quiet: bool = True,
    **settings: str | int | float,
) -> contextlib.AbstractContextManager[Server]:
    """``python -m service`` on a free loopback port serving ``model_dir``, with ``CAMSERVE_*``
    overrides given as keyword arguments (``max_batch_size=1``). gRPC is off unless asked for
    (``grpc_port=free_port()``): servers on one machine must not share the default port 8001."""
    port = free_port()
    env = {
        **server_env(),
        "CAMSERVE_MODEL_DIR": str(model_dir),
        "CAMSERVE_HOST": "127.0.0.1",
        "CAMSERVE_PORT": str(port),
        "CAMSERVE_GRPC_PORT": "0",
        **{f"CAMSERVE_{key.upper()}": str(value) for key, value in settings.items()},
    }
    command = [sys.executable, "-m", "service"]
    return serving(name, command, env, port, log_path, start_timeout_s=start_timeout_s, quiet=quiet)


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

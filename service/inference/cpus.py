"""How many CPUs this process may really use: the affinity mask AND the cgroup CPU quota.

``os.sched_getaffinity`` alone counts every core of the node inside a container that Kubernetes or
Docker limits with a CPU quota (``resources.limits.cpu: 2`` on a 64-core node: 64 cores, 2 CPUs of
time). Sizing threads and workers from 64 there gets the process throttled. The quota is the
cgroup's ``cpu.max`` (v2: ``"<quota> <period>"`` or ``"max <period>"``) or ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us`` (v1; quota -1: none), on the process's own cgroup or any ancestor: the
tightest one counts. A fractional quota is rounded down (at least 1), as Go's automaxprocs does: a
thread more than the quota only queues for throttled time.

``root`` lets a test point every path at a fake file tree.
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath

CGROUP_MOUNT = "sys/fs/cgroup"


def affinity_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestors(cgroup_path: str) -> list[PurePosixPath]:
    """The cgroup's own directory first, then each parent up to the mount's root."""
    path = PurePosixPath("/") / cgroup_path.lstrip("/")
    return [path, *path.parents]


def _v2_quota(text: str | None) -> float | None:
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_quota(root: Path | str = "/") -> float | None:
    """CPUs of time the cgroup allows this process (e.g. 1.5), or None where there is no quota."""
    root = Path(root)
    mount = root / CGROUP_MOUNT
    membership = _read(root / "proc/self/cgroup") or ""
    limits: list[float] = []
    for line in membership.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2, unified hierarchy
            for directory in _ancestors(path):
                quota = _v2_quota(_read(mount / str(directory).lstrip("/") / "cpu.max"))
                if quota is not None:
                    limits.append(quota)
        elif "cpu" in controllers.split(","):  # cgroup v1: "cpu,cpuacct" or "cpu"
            for name in (controllers, "cpu", "cpu,cpuacct"):
                base = mount / name
                if not base.is_dir():
                    continue
                # Inside a container the listed path is often the host's, absent from this mount: the
                # mount's root is then the container's own cgroup.
                for directory in _ancestors(path):
                    quota = _v1_quota(base / str(directory).lstrip("/"))
                    if quota is not None:
                        limits.append(quota)
                break
    if not membership:  # no /proc/self/cgroup: look at the mount's root alone
        for quota in (_v2_quota(_read(mount / "cpu.max")), _v1_quota(mount / "cpu")):
            if quota is not None:
                limits.append(quota)
    return min(limits) if limits else None


def available_cpus(root: Path | str = "/", affinity: int | None = None) -> int:
    """CPUs to size threads and workers by: the affinity mask, capped by the cgroup quota."""
    cpus = affinity if affinity is not None else affinity_cpus()
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)

"""Each request's id and its one line in the access log.

Ids for requests that bring none are unique without a syscall per request (``uuid4`` reads
``os.urandom`` each time): a random prefix per app (each worker process builds its own), then a counter.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from typing import Any

access_log = logging.getLogger("camserve.access")
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before its answer
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


class RequestIds:
    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"  # 32 hex digits, as uuid4().hex

    def accept_or_make(self, given: bytes | None) -> str:
        """The client's ``X-Request-ID`` when it is a safe token (at most 128 of ``A-Za-z0-9._:-``), else a new id."""
        return given.decode("ascii") if given is not None and _SAFE_ID.match(given) else self.next()


def log_request(record: dict[str, Any]) -> None:
    """One JSON line: event, request_id, method, path, status, duration_ms, and images / trace_id when known."""
    access_log.info(json.dumps(record))

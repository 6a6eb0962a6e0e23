"""Every refusal as a gRPC status code: the one error path of the gRPC front.

The codes follow the REST side's statuses (service/http/errors.py) as Triton and KServe map them:
a bad tensor or image INVALID_ARGUMENT (400, 415, 422), too many images or pixels RESOURCE_EXHAUSTED
(413; a message over the size limit gets it from grpc itself), no such model NOT_FOUND (404), no or a
wrong key UNAUTHENTICATED (401), not ready, queue full, decode budget busy or draining UNAVAILABLE
(503), no answer in time DEADLINE_EXCEEDED (504), model control off FAILED_PRECONDITION. Only a failed
batch or a bug is INTERNAL; nothing a client sent is ever UNKNOWN or INTERNAL.
"""

from __future__ import annotations

import grpc

from service.decoding.budget import DecodeBusy
from service.decoding.probe import ImageRejected
from service.fronts.gate import Refused
from service.fronts.model import UnknownModel
from service.fronts.tensors import TensorError, TooManyImages

BY_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.FAILED_PRECONDITION,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class Abort(Exception):
    """A refusal the gRPC handlers raise themselves (the key, model control, a load's parameters)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str, str | None] | None:
    """(code, message, rejection reason for the metrics or None) for a refusal; None: a bug."""
    if isinstance(exc, Abort):
        return exc.code, str(exc), None
    if isinstance(exc, TensorError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), None
    if isinstance(exc, TooManyImages):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), None
    if isinstance(exc, UnknownModel):
        return grpc.StatusCode.NOT_FOUND, str(exc), None
    if isinstance(exc, Refused):  # counted by service.fronts.gate already
        return BY_HTTP_STATUS.get(exc.status, grpc.StatusCode.INTERNAL), str(exc), None
    if isinstance(exc, ImageRejected):
        return (
            BY_HTTP_STATUS.get(exc.status_code, grpc.StatusCode.INVALID_ARGUMENT),
            str(exc),
            f"image_{exc.status_code}",
        )
    if isinstance(exc, DecodeBusy):
        return grpc.StatusCode.UNAVAILABLE, str(exc), "decode_busy"
    return None

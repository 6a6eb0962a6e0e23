"""Who gets in, for the JSON API and the Open Inference Protocol alike: readiness, the API key and room
in an endpoint's queue, checked before the body is read; and the batchers' refusals as HTTP answers.

The checks themselves are the protocol-neutral ones gRPC uses too (service/protocol/gate.py); this
module turns their refusals into HTTP answers. Every 503 says ``Retry-After: CAMSERVE_RETRY_AFTER_S``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from service.http.auth import authorize, checks_key
from service.protocol import gate
from service.protocol.gate import Readiness as Readiness
from service.protocol.gate import readiness as readiness
from service.state import ServiceState


def retry_after(state: ServiceState) -> dict[str, str]:
    return {"Retry-After": str(state.settings.retry_after_s)}


def service_state(request: Request) -> ServiceState:
    return request.app.state.camserve


async def ready_state(request: Request) -> ServiceState:
    """The service, once it is ready; else 503."""
    state = service_state(request)
    refusal = gate.not_ready(state)
    if refusal is not None:
        raise HTTPException(refusal.status, str(refusal), headers=retry_after(state))
    return state


@checks_key
async def authorized_state(request: Request) -> ServiceState:
    """The service, once it is ready (503) and the request carries the API key where one is set (401)."""
    state = await ready_state(request)
    authorize(state, request.headers)
    return state


State = Annotated[ServiceState, Depends(ready_state)]
AuthorizedState = Annotated[ServiceState, Depends(authorized_state)]


def admit(state: ServiceState, batcher_name: str) -> None:
    """503 while the endpoint's queue is full or the service drains (:func:`service.protocol.gate.queue_refusal`)."""
    refusal = gate.queue_refusal(state, batcher_name)
    if refusal is not None:
        raise HTTPException(refusal.status, str(refusal), headers=retry_after(state))


def admitted(batcher_name: str) -> Any:
    """The one dependency of an endpoint that queues images: ready, authorised, and room in its queue,
    checked in that order before the body is read. One dependency, not three: FastAPI's solving of
    each costs the single-image request more than the check itself (service/http/auth.py)."""

    @checks_key
    async def dependency(request: Request) -> ServiceState:
        state = await authorized_state(request)
        admit(state, batcher_name)
        return state

    return Annotated[ServiceState, Depends(dependency)]


async def submit(state: ServiceState, batcher_name: str, payloads: list) -> list:
    """Submit to an endpoint's batcher, turning its refusals into HTTP answers."""
    try:
        return await gate.submit(state, batcher_name, payloads)
    except gate.Refused as exc:
        headers = retry_after(state) if exc.status == 503 else None
        raise HTTPException(exc.status, str(exc), headers=headers) from None

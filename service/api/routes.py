"""camserve's JSON API: an endpoint is a module here with its own ``router``, listed below.

HEAD is answered wherever GET is (:func:`service.http.routing.answer_head_where_get`), once, at import.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api import gradcam, health, ops, page, predict
from service.http.routing import answer_head_where_get

ROUTERS: tuple[APIRouter, ...] = tuple(
    answer_head_where_get(module.router) for module in (predict, gradcam, health, ops, page)
)

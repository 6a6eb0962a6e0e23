"""Route conventions shared by both APIs."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.routing import APIRoute


def answer_head_where_get(router: APIRouter) -> APIRouter:
    """HEAD on every GET endpoint, by the same handler (the server sends the headers without the body),
    as Starlette's plain routes do; FastAPI's answer 405. Kept out of the OpenAPI schema."""
    for route in list(router.routes):
        if isinstance(route, APIRoute) and "GET" in route.methods and "HEAD" not in route.methods:
            router.add_api_route(
                route.path,
                route.endpoint,
                methods=["HEAD"],
                response_model=route.response_model,
                response_class=route.response_class,
                dependencies=route.dependencies,
                include_in_schema=False,
            )
    return router

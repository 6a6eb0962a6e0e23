"""The Open Inference Protocol's routers: the explanation model (first: its routes match its name only),
inference and health, and the model repository."""

from __future__ import annotations

from fastapi import APIRouter

from service.oip import explain, inference, repository

ROUTERS: tuple[APIRouter, ...] = (explain.router, inference.router, repository.router)

"""The Open Inference Protocol's routers: inference and health, and the model repository."""

from __future__ import annotations

from fastapi import APIRouter

from service.oip import inference, repository

ROUTERS: tuple[APIRouter, ...] = (inference.router, repository.router)

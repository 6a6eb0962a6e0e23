"""The engine contract (service.inference.contract.Engine): every engine has all of it, and batches reach
engines through batch functions, not method names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from camcore.bundle import load_bundle
from service.inference.contract import Engine, run_gradcam, run_predict
from service.inference.jobs import GradcamJob
from service.inference.null_engine import NullEngine
from service.inference.registry import build_engine
from service.settings import Settings


def test_the_torch_and_null_engines_fulfil_the_engine_contract(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    device = torch.device("cpu")
    torch_engine = build_engine(bundle, Settings(model_dir=bundle_dir, precision="fp32", max_batch_size=4), device)
    null_engine = build_engine(bundle, Settings(model_dir=bundle_dir, engine="null"), device)
    assert isinstance(null_engine, NullEngine)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    for engine in (torch_engine, null_engine):
        assert isinstance(engine, Engine), type(engine).__name__  # every attribute and method is there
        assert isinstance(engine.compiled, bool) and isinstance(engine.device_name, str)
        rows = run_predict(engine, [image, image])
        assert len(rows) == 2 and isinstance(rows[0], np.ndarray) and rows[0].shape == (len(bundle.classes),)
        assert abs(float(rows[0].sum()) - 1.0) < 1e-4
        (row,) = run_gradcam(engine, [GradcamJob(image, bundle.default_cam_layer, None)])
        assert row.heatmap.shape == (32, 32) and 0 <= row.target < len(bundle.classes)
    assert torch_engine.compiled and not null_engine.compiled


def test_something_without_the_contract_is_not_an_engine():
    class HalfEngine:
        def predict(self, images):
            return images

    assert not isinstance(HalfEngine(), Engine)

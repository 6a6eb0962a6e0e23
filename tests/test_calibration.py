"""Temperature scaling: the fit, the metrics, the calibrate command, and the temperature as served."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import CLASSES, encode, make_image_folder, random_image
from PIL import Image
from torchmetrics.functional.classification import multiclass_calibration_error

from camcore.bundle import load_bundle, sha256_of
from camcore.calibration import (
    T_MAX,
    T_MIN,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    served_probabilities,
)
from camcore.forward import ServedForward, in_batches
from camcore.preprocess import image_to_uint8
from service.api.schemas import Health
from service.app import create_app
from service.settings import Settings
from training import data
from training.calibration import SplitMismatch, calibrate_bundle, calibration_record

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "cifar10-resnet"


def synthetic_logits(n: int, views: int, seed: int) -> torch.Tensor:
    """(views, n, 10) logits: one spread-out score vector per image, each view a perturbed copy of it."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 10, generator=generator, dtype=torch.float64) * 2.5
    return torch.stack(
        [base + 0.7 * torch.randn(n, 10, generator=generator, dtype=torch.float64) for _ in range(views)]
    )


def labels_drawn_from(view_logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """Labels sampled from the served distribution at ``temperature``: T is then the true calibration.
    (Seeds offset from the logits': one seed for both would tie the draws to the scores.)"""
    probabilities = served_probabilities(view_logits, temperature)
    generator = torch.Generator().manual_seed(10_000 + seed)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


def ece_by_hand(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Guo et al.'s top-1 ECE written out in numpy: bins (m/M, (m+1)/M], |accuracy - confidence| weighted by size."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    total = 0.0
    for m in range(n_bins):
        lower, upper = m / n_bins, (m + 1) / n_bins
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


# -- the fit ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("views", [1, 2])
def test_fit_recovers_a_known_temperature(true_temperature: float, views: int):
    logits = synthetic_logits(20_000, views, seed=views)
    labels = labels_drawn_from(logits, true_temperature, seed=1)
    fitted = fit_temperature(logits.float(), labels)
    assert fitted == pytest.approx(true_temperature, rel=0.04)
    # and it is the NLL minimum: nudging T either way only makes the served NLL worse
    nll = lambda t: negative_log_likelihood(served_probabilities(logits, t), labels)  # noqa: E731
    assert nll(fitted) < min(nll(fitted * 0.97), nll(fitted * 1.03))


def test_fit_takes_inference_mode_tensors_and_rejects_mismatched_shapes():
    logits = synthetic_logits(2_000, 2, seed=3)
    labels = labels_drawn_from(logits, 0.7, seed=4)
    with torch.inference_mode():  # as in_batches hands them over
        frozen, frozen_labels = logits.clone(), labels.clone()
    assert fit_temperature(frozen, frozen_labels) == pytest.approx(fit_temperature(logits, labels))
    with pytest.raises(ValueError, match="expected"):
        fit_temperature(logits, labels[:-1])


def test_a_held_out_set_without_a_finite_optimum_stops_at_a_bound():
    logits = synthetic_logits(50, 1, seed=6)
    all_right = served_probabilities(logits).argmax(1)
    # NLL falls for ever as T -> 0 when every answer is right: the fit stops at the lower bound, a loadable T.
    assert fit_temperature(logits, all_right) == pytest.approx(T_MIN)
    uniform = torch.zeros(1, 30, 10)
    assert T_MIN <= fit_temperature(uniform, torch.arange(30) % 10) <= T_MAX  # flat NLL: any T, but a finite one


# -- top-1 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.05, 0.54, 3.0, 40.0])
def test_a_temperature_leaves_every_top1_unchanged_where_the_views_agree(temperature: float):
    logits = synthetic_logits(5_000, 2, seed=5).float()
    single = served_probabilities(logits[:1], 1.0).argmax(1)
    assert torch.equal(served_probabilities(logits[:1], temperature).argmax(1), single)  # one view: always
    # Two views: each view's top-1 is T-invariant, so where both views pick the same class so does their mean.
    agree = logits[0].argmax(1) == logits[1].argmax(1)
    assert 0.5 < agree.float().mean() < 1.0  # the data has both cases
    before, after = served_probabilities(logits, 1.0).argmax(1), served_probabilities(logits, temperature).argmax(1)
    assert torch.equal(after[agree], before[agree])


def test_where_the_views_disagree_a_temperature_can_tip_the_mean():
    """Why model.json counts ``top1_changed`` under flip TTA instead of assuming it is zero."""
    # The image says class 0 firmly; its mirror says class 1 and rules class 0 out. At T=1 the mean of the
    # probabilities picks 0; as T grows it tends to the mean of the logits, which favours 1.
    views = torch.tensor([[[4.0, 0.0, 0.0]], [[-4.0, 1.0, 0.0]]])
    assert served_probabilities(views, 1.0).argmax(1).item() == 0
    assert served_probabilities(views, 10.0).argmax(1).item() == 1
    assert served_probabilities(views[:1], 10.0).argmax(1).item() == 0  # either view alone: never tipped


# -- metrics -----------------------------------------------------------------------------------------------
def test_ece_nll_brier_match_independent_implementations():
    logits = synthetic_logits(8_000, 2, seed=7)
    labels = labels_drawn_from(logits, 0.6, seed=8)
    probabilities = served_probabilities(logits, 1.0).float()  # deliberately miscalibrated: T=1 against a true 0.6
    report = calibration_report(probabilities, labels)
    assert report.ece > 0.05
    assert report.ece == pytest.approx(ece_by_hand(probabilities.numpy(), labels.numpy()), abs=1e-6)
    torchmetrics_ece = multiclass_calibration_error(probabilities, labels, num_classes=10, n_bins=15, norm="l1")
    assert report.ece == pytest.approx(float(torchmetrics_ece), abs=1e-5)
    assert report.nll == pytest.approx(float(torch.nn.functional.nll_loss(probabilities.double().log(), labels)))
    one_hot = np.eye(10)[labels.numpy()]
    assert report.brier == pytest.approx(float(((probabilities.double().numpy() - one_hot) ** 2).sum(1).mean()))
    bins = reliability_bins(probabilities, labels)
    assert sum(b.count for b in bins) == len(labels) and len(bins) == 15
    assert expected_calibration_error(bins) == report.ece


def test_a_fitted_temperature_calibrates_held_out_data():
    logits = synthetic_logits(12_000, 2, seed=9)
    labels = labels_drawn_from(logits, 0.6, seed=10)
    fit, test = slice(0, 4_000), slice(4_000, None)
    temperature = fit_temperature(logits[:, fit], labels[fit])
    before = calibration_report(served_probabilities(logits[:, test]), labels[test])
    after = calibration_report(served_probabilities(logits[:, test], temperature), labels[test])
    assert after.ece < before.ece / 3 and after.nll < before.nll and after.brier < before.brier


def test_recorded_ece_matches_an_independent_one():
    """What export and calibrate write into model.json is the ECE of the served probabilities, recomputed here."""
    val_logits, test_logits = synthetic_logits(3_000, 2, seed=11), synthetic_logits(6_000, 2, seed=12)
    val_labels, test_labels = labels_drawn_from(val_logits, 0.6, seed=13), labels_drawn_from(test_logits, 0.6, seed=14)
    record = calibration_record(val_logits, val_labels, test_logits, test_labels, {}, resamples=20)
    record = json.loads(json.dumps(record))
    temperature = record["temperature"]
    assert record["fitted_on"]["images"] == 3_000 and record["fitted_for_tta"] == "flip"
    low, high = record["fitted_on"]["temperature_interval_90"]
    assert low < temperature < high
    for mode, views in (("flip", test_logits), ("none", test_logits[:1])):
        for phase, t in (("before", 1.0), ("after", temperature)):
            # independently: numpy softmax of logits / T per view, mean over views
            z = views.numpy() / t
            p = np.exp(z - z.max(-1, keepdims=True))
            p = (p / p.sum(-1, keepdims=True)).mean(0)
            reported = record["test"][mode][phase]
            assert reported["ece"] == pytest.approx(ece_by_hand(p, test_labels.numpy()), abs=2e-5)
            assert reported["accuracy"] == pytest.approx(float((p.argmax(1) == test_labels.numpy()).mean()), abs=1e-5)
    # T was fitted for flip, the mode the labels were drawn from: there it must help.
    assert record["test"]["flip"]["after"]["ece"] < record["test"]["flip"]["before"]["ece"] / 2


@pytest.mark.skipif(not (SHIPPED / "model.json").is_file(), reason="shipped bundle not present")
def test_shipped_bundle_records_its_calibration_consistently():
    meta = json.loads((SHIPPED / "model.json").read_text())
    calibration = meta["calibration"]
    assert calibration["fitted_on"]["images"] == meta["val_images"]
    assert calibration["fitted_on"]["val_accuracy_remeasured"] == meta["val_accuracy"]
    assert load_bundle(SHIPPED).temperature == calibration["temperature"]
    for mode in ("flip", "none"):
        for phase in ("before", "after"):
            figures = calibration["test"][mode][phase]
            bins = figures["reliability"]
            assert len(bins) == calibration["ece_bins"] == 15 and sum(b["count"] for b in bins) == 10_000
            from_bins = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / 10_000
            assert figures["ece"] == pytest.approx(from_bins, abs=1e-4)
        before_accuracy = meta["test_accuracy_flip_tta" if mode == "flip" else "test_accuracy"]
        assert calibration["test"][mode]["before"]["accuracy"] == pytest.approx(before_accuracy, abs=1e-5)


# -- the calibrate command ------------------------------------------------------------------------------------
@pytest.fixture
def tiny_bundle(tmp_path: Path, bundle_dir: Path, cache_dir: Path) -> tuple[Path, Path]:
    """A copy of the test bundle that says it held out 20 of a tiny data set's 60 training images."""
    folder = make_image_folder(tmp_path / "data")
    bundle_path = tmp_path / "bundle"
    bundle_path.mkdir()
    for item in bundle_dir.iterdir():
        if item.is_file():
            (bundle_path / item.name).write_bytes(item.read_bytes())
    bundle = load_bundle(bundle_path)
    cifar = data.load("folder", folder, cache_dir)
    _, val = data.train_val_split(cifar.train, 20, 7)
    forward = ServedForward.from_bundle(bundle).eval()
    val_accuracy = round(float((in_batches(forward, val.images).argmax(1) == val.labels).float().mean()), 5)
    meta = json.loads((bundle_path / "model.json").read_text())
    meta.update(
        seed=7,
        val_images=20,
        val_accuracy=val_accuracy,
        dataset={"source": "folder", "location": str(folder), "train_images": 40},
        notes={"written": "by someone else"},
    )
    (bundle_path / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return bundle_path, folder


def test_calibrate_rewrites_only_the_calibration_key(tiny_bundle, cache_dir: Path):
    bundle_path, folder = tiny_bundle
    before = json.loads((bundle_path / "model.json").read_text())
    weights = sha256_of(bundle_path / "model.safetensors")
    record = calibrate_bundle(bundle_path, data_dir=str(folder), cache_dir=cache_dir)
    after = json.loads((bundle_path / "model.json").read_text())
    assert after.pop("calibration") == json.loads(json.dumps(record))
    assert after == before and list(after)[-1] == "weights_sha256"  # every other key as it was, checksum last
    assert sha256_of(bundle_path / "model.safetensors") == weights == after["weights_sha256"]
    assert (
        record["fitted_on"]["images"] == 20 and record["fitted_on"]["val_accuracy_remeasured"] == before["val_accuracy"]
    )
    assert record["test"]["flip"]["after"]["images"] == 30  # the tiny set's test images, never fitted on
    assert load_bundle(bundle_path).temperature == record["temperature"]


def test_calibrate_refuses_a_split_it_cannot_reproduce(tiny_bundle, cache_dir: Path):
    bundle_path, folder = tiny_bundle
    meta = json.loads((bundle_path / "model.json").read_text())
    meta["seed"] = 8  # another seed holds out other images: the recorded val accuracy won't re-measure
    meta["val_accuracy"] = round(meta["val_accuracy"] + 0.05, 5)
    (bundle_path / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    untouched = (bundle_path / "model.json").read_bytes()
    with pytest.raises(SplitMismatch, match="not the same held-out images"):
        calibrate_bundle(bundle_path, data_dir=str(folder), cache_dir=cache_dir)
    meta["dataset"]["train_images"] = 41
    (bundle_path / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    with pytest.raises(SplitMismatch, match="held out 20"):
        calibrate_bundle(bundle_path, data_dir=str(folder), cache_dir=cache_dir)
    assert "calibration" not in json.loads(untouched)


# -- served with its temperature -----------------------------------------------------------------------------
@pytest.mark.parametrize("tta", ["flip", "none"])
async def test_predict_serves_the_bundles_temperature(tmp_path: Path, bundle_dir: Path, tta: str):
    bundle_path = tmp_path / "bundle"
    bundle_path.mkdir()
    for item in bundle_dir.iterdir():
        if item.is_file():
            (bundle_path / item.name).write_bytes(item.read_bytes())
    temperature = 0.02  # the untrained test net is nearly uniform: a small T makes its answers differ visibly
    meta = json.loads((bundle_path / "model.json").read_text())
    meta["calibration"] = {"temperature": temperature}
    (bundle_path / "model.json").write_text(json.dumps(meta, indent=2) + "\n")

    settings = Settings(model_dir=bundle_path, precision="fp32", max_batch_size=4, tta=tta, log_requests=False)
    app = create_app(settings)
    payloads = [encode(random_image(seed)) for seed in range(5)]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://camserve") as client,
    ):
        health = Health.model_validate((await client.get("/health")).json())
        response = await client.post(
            "/predict?top_k=10", files=[("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(payloads)]
        )
    assert health.model.calibration is not None and health.model.calibration.temperature == temperature
    served = torch.zeros(len(payloads), 10, dtype=torch.float64)
    for row, prediction in enumerate(response.json()["predictions"]):
        for entry in prediction["top_k"]:
            served[row, entry["index"]] = entry["probability"]

    # Independently: normalise by hand, each view's logits / T, softmax, mean over the views.
    model = load_bundle(bundle_path).model
    images = torch.stack([image_to_uint8(Image.open(io.BytesIO(p))) for p in payloads]).double()
    mean = torch.tensor(meta["mean"], dtype=torch.float64).view(1, 3, 1, 1) * 255
    std = torch.tensor(meta["std"], dtype=torch.float64).view(1, 3, 1, 1) * 255
    x = ((images - mean) / std).float()
    with torch.inference_mode():
        views = [model(x).double()] + ([model(x.flip(3)).double()] if tta == "flip" else [])
    expected = torch.stack([(v / temperature).softmax(1) for v in views]).mean(0)
    uncalibrated = torch.stack([v.softmax(1) for v in views]).mean(0)
    error = (served - expected).abs().max().item()
    assert error < 1e-4 and (served - uncalibrated).abs().max().item() > 100 * error
    assert math.isclose(served.sum(1).min().item(), 1.0, abs_tol=1e-5)


async def test_health_reports_calibration_and_the_served_accuracy_after_it(tiny_bundle, cache_dir: Path):
    bundle_path, folder = tiny_bundle
    record = calibrate_bundle(bundle_path, data_dir=str(folder), cache_dir=cache_dir)
    for tta in ("flip", "none"):
        app = create_app(
            Settings(model_dir=bundle_path, precision="fp32", max_batch_size=4, tta=tta, log_requests=False)
        )
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://camserve") as client,
        ):
            body = (await client.get("/health")).json()
        Health.model_validate(body)
        calibration = body["model"]["calibration"]
        assert calibration["temperature"] == record["temperature"] and calibration["fitted_on_images"] == 20
        assert set(calibration["test"]) == {"flip", "none"} and calibration["ece_bins"] == 15
        assert len(calibration["test"][tta]["after"]["reliability"]) == 15
        assert body["model"]["served_test_accuracy"] == record["test"][tta]["after"]["accuracy"]


def test_a_bundle_without_calibration_reports_none(bundle_dir: Path):
    from service.api.health import calibration_info, served_test_accuracy

    meta = load_bundle(bundle_dir).metadata
    assert calibration_info(meta) is None
    assert served_test_accuracy(meta, "flip") == meta["test_accuracy_flip_tta"]
    assert served_test_accuracy(meta, "none") == meta["test_accuracy"]
    assert meta["classes"] == CLASSES

"""The OpenVINO runtime for /predict: it answers what torch fp32 answers on real test images, its INT8
figures in model.json hold on a slice of the test set, a corrupt quantized network is refused (and a
reload to it keeps the old model), and a bundle without one serves as before."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from conftest import SHIPPED_BUNDLE, shared_cifar_archive
from helpers import encode, make_bundle, make_image_folder, point, random_image, real_test_slice
from PIL import Image
from pydantic import ValidationError

pytest.importorskip("openvino")

from camcore import openvino_forward as ovf
from camcore.bundle import (
    METADATA_FILE,
    QUANTIZED_BIN,
    QUANTIZED_KEY,
    QUANTIZED_XML,
    BundleError,
    load_bundle,
    sha256_of,
)
from camcore.calibration import calibration_report, served_probabilities
from camcore.forward import ServedForward, in_batches
from camcore.preprocess import image_to_uint8
from service.app import create_app
from service.inference.choice import choose_runtime, int8_eligible, openvino_precision
from service.inference.openvino_engine import OpenVinoEngine
from service.inference.torch_engine import TorchEngine
from service.settings import Settings

CPU = torch.device("cpu")
SLICE_PER_CLASS = 40  # 400 real test images for INT8's figures; every other one against fp32 (rounding level)

PNG = encode(random_image(3))
MODEL = "test-bundle"


def engine(bundle, precision: str, tta: str = "none") -> OpenVinoEngine:
    gradcam = TorchEngine(bundle, CPU, "fp32", 8, trace=False, tta=tta)
    return OpenVinoEngine(bundle, precision, gradcam, batch_size=8, tta=tta, streams=1, threads=2)


@pytest.fixture(scope="module")
def shipped_engine(shipped):
    """The shipped bundle's OpenVINO engine per (precision, TTA), each converted and compiled once."""
    engines: dict[tuple[str, str], OpenVinoEngine] = {}

    def get(precision: str, tta: str) -> OpenVinoEngine:
        if (precision, tta) not in engines:
            engines[precision, tta] = engine(shipped, precision, tta)
        return engines[precision, tta]

    return get


def probabilities(eng, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
    rows = [row for i in range(0, len(images), batch) for row in eng.predict(list(images[i : i + batch]))]
    return torch.from_numpy(np.stack(rows))


@pytest.fixture(scope="module")
def real_slice() -> SimpleNamespace:
    archive = shared_cifar_archive()
    if archive is None:
        pytest.skip("the real CIFAR-10 archive is not on this machine")
    rows = real_test_slice(archive, SLICE_PER_CLASS)
    classes = load_bundle(SHIPPED_BUNDLE).classes
    images = torch.stack([image_to_uint8(Image.open(io.BytesIO(data))) for _, data, _ in rows])
    labels = torch.tensor([classes.index(label) for _, _, label in rows])
    return SimpleNamespace(images=images, labels=labels)


@pytest.fixture(scope="module")
def shipped():
    return load_bundle(SHIPPED_BUNDLE)


@pytest.fixture(scope="module")
def fp32_views(shipped, real_slice) -> torch.Tensor:
    """Torch fp32 logits of the slice and of its mirrors, (2, N, classes), computed once for both TTA modes."""
    forward = ServedForward.from_bundle(shipped, precision="fp32", tta="flip").eval()
    return in_batches(forward, real_slice.images, 100, logits=True)


def fp32_reference(bundle, views: torch.Tensor, tta: str) -> torch.Tensor:
    """What torch fp32 serves, ServedForward's step 4 on the cached logits."""
    return served_probabilities(views[: 2 if tta == "flip" else 1], bundle.temperature)


# -- the compiled recipe answers what torch fp32 answers ---------------------------------------------------
@pytest.mark.parametrize("tta", ["flip", "none"])
def test_compiled_fp32_answers_what_torch_fp32_answers_on_real_images(
    shipped, shipped_engine, real_slice, fp32_views, tta
):
    compiled = probabilities(shipped_engine("fp32", tta), real_slice.images[::2])
    reference = fp32_reference(shipped, fp32_views[:, ::2], tta)
    assert compiled.shape == reference.shape == (len(real_slice.labels) // 2, 10)
    # Same recipe, same fp32 arithmetic up to the order of the sums: differences at rounding level.
    assert (compiled - reference).abs().max() < 1e-4
    assert torch.equal(compiled.argmax(1), reference.argmax(1))
    assert torch.allclose(compiled.sum(1), torch.ones(len(compiled)), atol=1e-5)


def test_compiled_bf16_agrees_with_torch_fp32(shipped, shipped_engine, real_slice, fp32_views):
    compiled = probabilities(shipped_engine("bf16", "none"), real_slice.images[::2])
    reference = fp32_reference(shipped, fp32_views[:, ::2], "none")
    agreement = float((compiled.argmax(1) == reference.argmax(1)).double().mean())
    assert agreement >= 0.99, agreement  # bf16 keeps 8 bits of mantissa: a near tie may flip, no more
    assert (compiled - reference).abs().max() < 0.1


# -- INT8: what model.json records holds on a slice --------------------------------------------------------
def within(measured: float, recorded: float, se: float, what: str) -> None:
    """Four standard errors of the slice's own estimate: a test that fails about once in 16,000 runs by chance."""
    assert abs(measured - recorded) <= 4 * se + 1e-9, f"{what}: {measured:.4f} on the slice, {recorded:.4f} recorded"


@pytest.mark.parametrize("tta", ["flip", "none"])
def test_int8_figures_in_model_json_hold_on_a_slice_of_the_test_set(
    shipped, shipped_engine, real_slice, fp32_views, tta
):
    record = shipped.metadata.get(QUANTIZED_KEY)
    if record is None:
        pytest.skip("the shipped bundle has no quantized network")
    recorded = record["test"][tta]
    int8 = probabilities(shipped_engine("int8", tta), real_slice.images)
    reference = fp32_reference(shipped, fp32_views, tta)
    labels, n = real_slice.labels, len(real_slice.labels)
    correct = (int8.argmax(1) == labels).double()
    agree = (int8.argmax(1) == reference.argmax(1)).double()
    # Binomial standard errors at the recorded rates (the slice's own would be 0 at a rate of 1).
    p = recorded["accuracy"]
    within(float(correct.mean()), p, math.sqrt(p * (1 - p) / n), "accuracy")
    a = recorded["agreement"]
    within(float(agree.mean()), a, math.sqrt(a * (1 - a) / n), "agreement with fp32")
    # INT8 against fp32 on the same images: the paired difference moves only where the two disagree.
    paired = correct - (reference.argmax(1) == labels).double()
    delta = recorded["accuracy"] - recorded["fp32_accuracy"]
    within(float(paired.mean()), delta, max(float(paired.std()), 1 / n) / math.sqrt(n), "accuracy - fp32's")
    # NLL and Brier: means of per-image values, with the slice's own standard error.
    p_true = int8.double().gather(1, labels[:, None]).squeeze(1)
    nll = -p_true.clamp_min(torch.finfo(torch.float32).tiny).log()
    within(float(nll.mean()), recorded["nll"], float(nll.std()) / math.sqrt(n), "NLL")
    brier = (int8.double() - torch.nn.functional.one_hot(labels, 10).double()).pow(2).sum(1)
    within(float(brier.mean()), recorded["brier"], float(brier.std()) / math.sqrt(n), "Brier")
    # The served probabilities use the temperature refitted for INT8.
    assert calibration_report(int8, labels).images == n
    assert shipped_engine("int8", tta).temperature == record["temperature"]


def test_shipped_bundle_records_what_auto_precision_reads(shipped):
    record = shipped.metadata.get(QUANTIZED_KEY)
    if record is None:
        pytest.skip("the shipped bundle has no quantized network")
    assert set(record["test"]) == {"flip", "none"}
    for figures in record["test"].values():
        assert {"accuracy", "fp32_accuracy", "agreement", "ece", "nll", "brier"} <= set(figures)
        assert figures["images"] == 10_000
    assert record["calibration_images"]["images"] == shipped.metadata["val_images"]  # the held-out images
    assert (SHIPPED_BUNDLE / QUANTIZED_BIN).stat().st_size < 16 * 2**20  # INT8 weights: about a byte each


# -- auto precision --------------------------------------------------------------------------------------
def fake(metadata: dict) -> SimpleNamespace:
    return SimpleNamespace(metadata=metadata, path=Path("/nowhere"))


def quantized_record(agreement: float, accuracy: float, fp32_accuracy: float) -> dict:
    figures = {"agreement": agreement, "accuracy": accuracy, "fp32_accuracy": fp32_accuracy}
    return {QUANTIZED_KEY: {"test": {"flip": figures, "none": figures}}, "precision_agreement": {"bf16": 0.9998}}


@pytest.mark.parametrize(
    ("metadata", "native", "expected"),
    [
        (quantized_record(0.9956, 0.9266, 0.9277), True, "int8"),
        (quantized_record(0.9950, 0.9247, 0.9277), True, "int8"),  # both at their limits
        (quantized_record(0.9949, 0.9266, 0.9277), True, "bf16"),  # agreement short
        (quantized_record(0.9990, 0.9240, 0.9277), True, "bf16"),  # 0.37 points less accurate
        (quantized_record(0.9990, 0.9240, 0.9277), False, "fp32"),  # and no native bf16
        ({"precision_agreement": {"bf16": 0.9998}}, True, "bf16"),  # no quantized network: as before
        ({"precision_agreement": {"bf16": 0.9900}}, True, "fp32"),
        ({"precision_agreement": {"bf16": 0.9998}}, False, "fp32"),
    ],
)
def test_auto_picks_the_fastest_precision_the_bundles_measurements_allow(metadata, native, expected):
    precision, reason = openvino_precision(fake(metadata), "auto", "flip", native)
    assert precision == expected, reason
    assert reason.startswith("auto: ")


def test_settings_override_auto_and_refuse_what_no_engine_serves():
    bundle = fake(quantized_record(0.9, 0.5, 0.9))
    assert openvino_precision(bundle, "int8", "none", True) == ("int8", "set by CAMSERVE_PRECISION=int8")
    assert openvino_precision(bundle, "fp32", "none", True)[0] == "fp32"
    with pytest.raises(BundleError, match="no quantized network"):
        openvino_precision(fake({}), "int8", "none", True)
    with pytest.raises(ValidationError, match="int8 runs on the openvino runtime"):
        Settings(precision="int8", runtime="torch")
    with pytest.raises(ValidationError, match="not fp16"):
        Settings(precision="fp16", runtime="openvino")
    assert choose_runtime(Settings(runtime="auto"), CPU)[0] == "openvino"
    assert choose_runtime(Settings(runtime="auto"), torch.device("cuda"))[0] == "torch"  # CUDA hosts keep torch
    assert choose_runtime(Settings(runtime="auto", precision="fp16"), CPU)[0] == "torch"
    assert choose_runtime(Settings(runtime="torch"), CPU) == ("torch", "set by CAMSERVE_RUNTIME=torch")


# -- bundles with (broken) quantized networks ---------------------------------------------------------------
def add_quantized(path: Path, agreement: float = 0.999) -> Path:
    """A stand-in "quantized" network for a test bundle: its fp32 network as IR (what matters here is the
    file handling), and a record as ``python -m training quantize`` writes it."""
    bundle = load_bundle(path)
    ovf.save_network(ovf.convert_network(bundle.model), path / QUANTIZED_XML)
    figures = {"agreement": agreement, "accuracy": 0.1, "fp32_accuracy": 0.1, "ece": 0, "nll": 0, "brier": 0}
    metadata = json.loads((path / METADATA_FILE).read_text())
    metadata[QUANTIZED_KEY] = {
        "temperature": 1.0,
        "test": {"flip": figures, "none": figures},
        "weights_sha256": bundle.version,
        "files": {name: sha256_of(path / name) for name in (QUANTIZED_XML, QUANTIZED_BIN)},
    }
    (path / METADATA_FILE).write_text(json.dumps(metadata))
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("openvino")
    plain = make_bundle(root / "plain" / MODEL, seed=0)
    quantized = add_quantized(make_bundle(root / "quantized" / MODEL, seed=1))
    corrupt = root / "corrupt" / MODEL
    shutil.copytree(quantized, corrupt)
    data = bytearray((corrupt / QUANTIZED_BIN).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / QUANTIZED_BIN).write_bytes(bytes(data))
    return SimpleNamespace(plain=plain, quantized=quantized, corrupt=corrupt)


def test_a_corrupt_missing_or_foreign_quantized_network_is_refused_with_a_clear_error(bundles, tmp_path):
    assert QUANTIZED_KEY in load_bundle(bundles.quantized).metadata
    with pytest.raises(BundleError, match=rf"{QUANTIZED_BIN}: sha256 .* \(corrupt or replaced quantized network\)"):
        load_bundle(bundles.corrupt)
    missing = shutil.copytree(bundles.quantized, tmp_path / "missing")
    (missing / QUANTIZED_XML).unlink()
    with pytest.raises(BundleError, match=rf"{QUANTIZED_XML}: missing"):
        load_bundle(missing)
    foreign = shutil.copytree(bundles.quantized, tmp_path / "foreign")
    metadata = json.loads((foreign / METADATA_FILE).read_text())
    metadata[QUANTIZED_KEY]["weights_sha256"] = "0" * 64
    (foreign / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match=r"quantized network was made from weights 0+, not these"):
        load_bundle(foreign)


@pytest.fixture
async def served(bundles: SimpleNamespace, tmp_path: Path):
    link = tmp_path / "current"
    point(link, bundles.quantized)
    settings = Settings(
        model_dir=link, runtime="auto", max_batch_size=4, tta="none", log_requests=False, model_control=True
    )
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://camserve", timeout=120) as client,
    ):
        yield SimpleNamespace(app=app, client=client, link=link)


async def test_auto_serves_int8_says_why_and_a_reload_to_a_corrupt_one_keeps_it(served, bundles):
    client = served.client
    health = (await client.get("/health")).json()
    assert health["runtime"].startswith("openvino ") and health["runtime_reason"].startswith("auto: ")
    assert health["precision"] == "int8" and "agreement with fp32 99.90%" in health["precision_reason"]
    assert health["batching"]["traced"] is True
    version = health["model"]["version"]
    answer = await client.post("/predict", files=[("files", ("a.png", PNG))] * 3)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
    cam = await client.post("/gradcam", files=[("files", ("a.png", PNG))])
    assert cam.status_code == 200  # Grad-CAM runs on the torch engine inside

    point(served.link, bundles.corrupt)
    refused = await client.post(f"/v2/repository/models/{MODEL}/load")
    assert refused.status_code == 400
    assert "sha256" in refused.json()["error"] and f"still serving {version}" in refused.json()["error"]
    health = (await client.get("/health")).json()
    assert health["model"]["version"] == version and health["precision"] == "int8"
    assert (await client.post("/predict", files=[("files", ("a.png", PNG))])).json()["model_version"] == version

    point(served.link, bundles.plain)  # no quantized network: the bf16 (or fp32) it served before
    loaded = await client.post(f"/v2/repository/models/{MODEL}/load")
    assert loaded.status_code == 200, loaded.text
    health = (await client.get("/health")).json()
    assert health["model"]["version"] != version
    assert health["precision"] == ("bf16" if ovf.native_bf16() else "fp32")
    assert "int8: the bundle has no quantized network" in health["precision_reason"]


async def test_a_bundle_without_a_quantized_network_serves_on_torch_as_before(bundles):
    settings = Settings(model_dir=bundles.plain, runtime="torch", max_batch_size=4, log_requests=False)
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://camserve", timeout=60) as client,
    ):
        health = (await client.get("/health")).json()
        assert health["runtime"] == f"torch {torch.__version__}" and health["runtime_reason"] == (
            "set by CAMSERVE_RUNTIME=torch"
        )
        assert health["precision"] in {"fp32", "bf16"}
        assert (await client.post("/predict", files=[("files", ("a.png", PNG))])).status_code == 200


def test_int8_on_a_bundle_without_a_quantized_network_is_refused(bundles):
    bundle = load_bundle(bundles.plain)
    with pytest.raises(BundleError, match="no quantized network"):
        engine(bundle, "int8")
    assert int8_eligible(bundle, "flip") == (False, "int8: the bundle has no quantized network")


# -- python -m training quantize ---------------------------------------------------------------------------
def test_quantize_writes_a_verified_int8_network_and_what_it_measured(tmp_path, bundle_dir, cache_dir):
    """On a tiny data set: 60 training images of which the bundle says it held out 20, 30 test images."""
    pytest.importorskip("nncf")
    from training import data
    from training.quantize import CANDIDATES, quantize_bundle

    folder = make_image_folder(tmp_path / "data")
    path = shutil.copytree(bundle_dir, tmp_path / "bundle")
    bundle = load_bundle(path)
    cifar = data.load("folder", folder, cache_dir)
    _, val = data.train_val_split(cifar.train, 20, 7)
    forward = ServedForward.from_bundle(bundle).eval()
    val_accuracy = round(float((in_batches(forward, val.images).argmax(1) == val.labels).float().mean()), 5)
    metadata = json.loads((path / METADATA_FILE).read_text())
    metadata.update(seed=7, val_images=20, val_accuracy=val_accuracy, dataset={"source": "folder", "train_images": 40})
    (path / METADATA_FILE).write_text(json.dumps(metadata))

    record = quantize_bundle(path, data_dir=str(folder), cache_dir=cache_dir)
    written = load_bundle(path)  # the files verify against their sha256
    assert written.metadata[QUANTIZED_KEY] == json.loads(json.dumps(record))
    assert record["weights_sha256"] == written.version and set(record["files"]) == {QUANTIZED_XML, QUANTIZED_BIN}
    assert record["calibration_images"]["images"] == 20 and record["calibration_images"]["views"] == 40
    assert len(record["chosen_by"]["candidates"]) == len(CANDIDATES)
    assert record["method"].endswith(min(record["chosen_by"]["candidates"].items(), key=lambda kv: kv[1])[0])
    # What the service answers at INT8 on the test images is what was recorded for them.
    int8 = engine(written, "int8", "flip")
    assert int8.temperature == record["temperature"]
    served = probabilities(int8, cifar.test.images)
    figures = record["test"]["flip"]
    assert figures["images"] == len(cifar.test) == 30
    assert round(float((served.argmax(1) == cifar.test.labels).double().mean()), 5) == figures["accuracy"]
    assert calibration_report(served, cifar.test.labels).nll == pytest.approx(figures["nll"], abs=1e-4)

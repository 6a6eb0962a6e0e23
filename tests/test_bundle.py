"""load_bundle: loads only safetensors + JSON, verifies, and names the file on every failure."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from harness import run_camserve
from helpers import make_bundle
from safetensors.torch import load_file, save_file

from camcore.bundle import METADATA_FILE, WEIGHTS_FILE, BundleError, load_bundle, sha256_of
from camcore.network import build_network


@pytest.fixture
def bundle(tmp_path: Path, bundle_dir: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    return copy


def _edit_metadata(path: Path, **changes) -> None:
    meta = json.loads((path / METADATA_FILE).read_text())
    meta.update(changes)
    (path / METADATA_FILE).write_text(json.dumps(meta))


def test_loads_fp32_eval_model_returning_logits(bundle: Path):
    loaded = load_bundle(bundle)
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.model.parameters())
    assert list(loaded.model.blocks) == ["prep", "layer1", "layer2", "layer3"]
    # The weights are the file's, tensor for tensor, and the model computes with them: its logits are
    # those of the network that make_bundle saved (built from the same seed), and not probabilities.
    saved = load_file(bundle / WEIGHTS_FILE)
    state = loaded.model.state_dict()
    assert set(saved) <= set(state) and all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    torch.manual_seed(0)
    original = build_network(10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = loaded.model(x)
        assert torch.equal(logits, original(x))
        assert not torch.equal(logits, build_network(10).eval()(x))  # another seed: other weights, other logits
    assert logits.shape == (2, 10) and (logits < 0).any()
    assert loaded.version == sha256_of(bundle / WEIGHTS_FILE)


def test_same_weights_same_predictions_across_loads(bundle: Path):
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(load_bundle(bundle).model(x), load_bundle(bundle).model(x))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: shutil.rmtree(p), "bundle directory does not exist"),
        (lambda p: (p / METADATA_FILE).unlink(), "model.json: missing"),
        (lambda p: (p / METADATA_FILE).write_text("{not json"), "model.json: not valid JSON"),
        (lambda p: (p / WEIGHTS_FILE).unlink(), "model.safetensors: missing"),
        (lambda p: _edit_metadata(p, architecture="resnet50"), "architecture 'resnet50'"),
        (lambda p: _edit_metadata(p, format=99), "bundle format 99"),
        (lambda p: _edit_metadata(p, classes=[]), "'classes' must be a non-empty list"),
        (lambda p: _edit_metadata(p, mean=[0.5]), "'mean' must be three numbers"),
    ],
)
def test_broken_bundles_fail_with_the_file_named(bundle: Path, damage, message):
    damage(bundle)
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_bundle(bundle)


def test_missing_keys_are_listed(bundle: Path):
    meta = json.loads((bundle / METADATA_FILE).read_text())
    del meta["weights_sha256"], meta["std"]
    (bundle / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"missing keys \['std', 'weights_sha256'\]"):
        load_bundle(bundle)


def test_corrupted_weights_fail_the_checksum(bundle: Path):
    data = bytearray((bundle / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.safetensors: sha256 .* does not match"):
        load_bundle(bundle)


def test_weights_of_another_shape_are_a_mismatch(bundle: Path):
    state = load_bundle(bundle).model.state_dict()
    state["head.2.weight"] = torch.zeros(5, 512)  # a 5-class head
    save_file(state, str(bundle / WEIGHTS_FILE))
    _edit_metadata(bundle, weights_sha256=sha256_of(bundle / WEIGHTS_FILE))
    with pytest.raises(BundleError, match="weights do not fit cifar-resnet9 with 10 classes"):
        load_bundle(bundle)


def test_a_malicious_pickle_never_runs(bundle: Path, tmp_path: Path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    payload = pickle.dumps({"net.prep.0.weight": Exploit()})
    (bundle / WEIGHTS_FILE).write_bytes(payload)
    _edit_metadata(bundle, weights_sha256=sha256_of(bundle / WEIGHTS_FILE))  # even with a matching checksum
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        load_bundle(bundle)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: unpickling it *would* have run code
    assert marker.exists()


@pytest.mark.server
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / METADATA_FILE).write_text("[]"), "expected a JSON object"),
        (lambda p: _edit_metadata(p, std=[0, 0, 0]), "'std' [0, 0, 0] must lie in (0, 1]"),
        (
            lambda p: _edit_nested(p, lambda meta: meta["misclassified"][0].update(file="/etc/hostname")),
            "file '/etc/hostname' must be a relative path inside the bundle",
        ),
    ],
)
def test_service_refuses_to_start_on_a_bad_bundle(bundle: Path, damage, message: str):
    damage(bundle)
    result = run_camserve(bundle)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot start: {bundle / METADATA_FILE}: {message}" in result.stderr


def test_shipped_bundle_is_valid_when_present():
    shipped = Path(__file__).resolve().parent.parent / "models" / "cifar10-resnet"
    if not (shipped / METADATA_FILE).is_file():
        pytest.skip("no shipped bundle in this checkout")
    loaded = load_bundle(shipped)
    meta = loaded.metadata
    assert len(meta["misclassified"]) >= 20
    for key in (
        "test_accuracy",
        "val_accuracy",
        "per_class_accuracy",
        "confusion_matrix",
        "trained_epochs",
        "training_seconds",
        "hardware",
        "dataset",
        "seed",
        "parameters",
        "input_size",
    ):
        assert key in meta, key
    assert sum(map(sum, meta["confusion_matrix"])) == meta["test_images"]


def test_make_bundle_helper_round_trips(tmp_path: Path):
    assert load_bundle(make_bundle(tmp_path / "b", seed=1)).metadata["name"] == "test-bundle"


# -- meaning, not only form (issue 24) ---------------------------------------------------------------------------
def _edit_nested(path: Path, edit) -> None:
    meta = json.loads((path / METADATA_FILE).read_text())
    edit(meta)
    (path / METADATA_FILE).write_text(json.dumps(meta))


def _rewrite_weights(path: Path, change) -> None:
    """New weights with a matching checksum: what someone with write access to the bundle can always do."""
    state = load_file(path / WEIGHTS_FILE)
    change(state)
    save_file(state, str(path / WEIGHTS_FILE))
    _edit_metadata(path, weights_sha256=sha256_of(path / WEIGHTS_FILE))


def _calibrated(meta: dict) -> dict:
    metrics = {"images": 10, "accuracy": 0.5, "ece": 0.1, "nll": 1.0, "brier": 0.5, "mean_confidence": 0.6}
    bins = [{"lower": 0.0, "upper": 1.0, "count": 10, "confidence": 0.6, "accuracy": 0.5}]
    comparison = {
        "before": {**metrics, "reliability": bins},
        "after": {**metrics, "reliability": bins},
        "top1_changed": 0,
    }
    return {"temperature": 0.5, "fitted_on": {"images": 20}, "ece_bins": 15, "test": {"flip": comparison}}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        # each of these loaded before, and then every answer (or /health, or the load) was a 500
        (lambda m: m.update(std=[0, 0, 0]), r"'std' \[0, 0, 0\] must lie in \(0, 1\]"),
        (lambda m: m.update(mean=[1e308, 0.5, 0.5]), r"'mean' .* must lie in \[0, 1\]"),
        (lambda m: m.update(mean=[float("nan"), 0.5, 0.5]), "'mean' must be three numbers"),
        (lambda m: m.update(std=[True, 0.5, 0.5]), "'std' must be three numbers"),
        (lambda m: m.update(std=[0.25, 0.25, 0.25, 0.25]), "'std' must be three numbers"),
        (lambda m: m.update(std=[1e-45, 0.25, 0.25]), "the network answers NaN or infinity"),
        (lambda m: m.update(input_size=224), "'input_size' 224, cifar-resnet9 takes 32"),
        (lambda m: m.update(calibration={**_calibrated(m), "test": []}), r"'calibration\.test'"),
        (lambda m: m["calibration"]["test"]["flip"]["after"].pop("ece"), r"'calibration\.test\.flip\.after\.ece'"),
        (lambda m: m["calibration"]["test"]["flip"].update(before=None), r"'calibration\.test\.flip\.before'"),
        (lambda m: m.update(calibration=None), "'calibration.temperature' must be a positive number"),
        (lambda m: m["calibration"].update(ece_bins="15"), r"'calibration\.ece_bins'"),
        (lambda m: m.update(gradcam=[]), "'gradcam'"),
        (lambda m: m.update(gradcam=None), "'gradcam'"),
        (lambda m: m["gradcam"].update(layers=[{"name": "prep"}]), r"'gradcam\.layers\.0\.channels'"),
        (lambda m: m["gradcam"].update(default_layer="layer9"), "'gradcam.default_layer' 'layer9' is none of"),
        (lambda m: m.update(cam_faithfulness={"road": "not a table"}), "'cam_faithfulness"),
        (lambda m: m.update(per_class_accuracy={"cat": "0.9"}), r"'per_class_accuracy\.cat'"),
        (lambda m: m.update(precision_agreement={"bf16": "high"}), r"'precision_agreement\.bf16'"),
        (lambda m: m.update(test_accuracy=float("inf")), "'test_accuracy'"),
        (lambda m: m.update(name="a/b"), "'name'"),
        (lambda m: m.update(misclassified={}), "'misclassified'"),
        (lambda m: m["misclassified"][0].pop("true_label"), r"'misclassified\.0\.true_label'"),
        (lambda m: m["misclassified"][0].update(predicted_label="unicorn"), "unknown labels {'unicorn'}"),
    ],
)
def test_values_the_service_cannot_serve_are_refused_with_the_key_named(bundle: Path, damage, message):
    _edit_nested(bundle, lambda meta: meta.update(calibration=_calibrated(meta)))
    load_bundle(bundle)  # the calibrated bundle itself is fine
    _edit_nested(bundle, damage)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_nan_weights_are_refused_even_with_a_matching_checksum(bundle: Path):
    _rewrite_weights(bundle, lambda state: state["head.2.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(BundleError, match=r"model\.safetensors: 'head\.2\.weight' holds NaN or infinity"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("file", "message"),
    [
        ("/etc/hostname", "must be a relative path inside the bundle"),
        ("../outside.png", "must be a relative path inside the bundle"),
        ("misclassified/../../outside.png", "must be a relative path inside the bundle"),
        ("misclassified/link.png", "leads out of the bundle directory"),  # a symlink to a file outside
        ("escape/outside.png", "leads out of the bundle directory"),  # a symlinked folder leading out
        ("misclassified\\..\\..\\outside.png", "backslash"),
        ("misclassified/a\x00.png", "NUL"),
        ("", "empty"),
        ("model.json", "not a PNG"),
    ],
)
def test_every_listed_file_stays_inside_the_bundle(bundle: Path, tmp_path: Path, file: str, message: str):
    outside = tmp_path / "outside.png"
    outside.write_bytes((bundle / "misclassified" / "000-test00000.png").read_bytes())
    (bundle / "misclassified" / "link.png").symlink_to(outside)
    (bundle / "escape").symlink_to(tmp_path, target_is_directory=True)
    _edit_nested(bundle, lambda meta: meta["misclassified"][0].update(file=file))
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(bundle)


def test_the_bundles_own_files_may_not_lead_out_either(bundle: Path, tmp_path: Path):
    # A symlink inside the bundle that stays inside is fine (Kubernetes mounts ConfigMaps so: ..data/...)
    (bundle / "misclassified" / "inner.png").symlink_to(bundle / "misclassified" / "000-test00000.png")
    _edit_nested(bundle, lambda meta: meta["misclassified"][0].update(file="misclassified/inner.png"))
    load_bundle(bundle)
    # The whole directory may be a symlink (a deployment swaps one), the weights may not lead out of it.
    link = tmp_path / "current"
    link.symlink_to(bundle, target_is_directory=True)
    load_bundle(link)
    moved = tmp_path / "elsewhere.safetensors"
    (bundle / WEIGHTS_FILE).rename(moved)
    (bundle / WEIGHTS_FILE).symlink_to(moved)
    with pytest.raises(BundleError, match=r"model\.safetensors: leads out of the bundle directory"):
        load_bundle(link)

"""load_bundle: loads only safetensors + JSON, verifies, and names the file on every failure."""

from __future__ import annotations

import json
import pickle
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
def test_service_refuses_to_start_on_a_bad_bundle(bundle: Path):
    (bundle / METADATA_FILE).write_text("[]")
    result = run_camserve(bundle)
    assert result.returncode == 2
    assert f"cannot start: {bundle / METADATA_FILE}: expected a JSON object" in result.stderr


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

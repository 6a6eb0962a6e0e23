"""The Lightning job on tiny generated data: sources, schedule, loss, smoke run, checkpoint parity."""

import copy
import itertools
import json
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from camcore.bundle import load_bundle
from camcore.preprocess import Normalize
from training import data
from training.augment import TrainTransform, cutmix, cutout, random_crop
from training.export import export_bundle, view_logits
from training.ghost_norm import GhostBatchNorm2d
from training.module import CifarResNetModule, smoothed_nll_loss
from training.schedule import custom_one_cycle_lr


def test_one_cycle_schedule_values():
    total = 100
    assert custom_one_cycle_lr(0, total, 0.2) == 0.0
    assert custom_one_cycle_lr(10, total, 0.2) == pytest.approx(0.5)
    assert custom_one_cycle_lr(20, total, 0.2) == pytest.approx(1.0)
    assert custom_one_cycle_lr(60, total, 0.2) == pytest.approx(0.5)
    assert custom_one_cycle_lr(100, total, 0.2) == pytest.approx(0.0)
    assert custom_one_cycle_lr(150, total, 0.2) == pytest.approx(0.0)
    values = [custom_one_cycle_lr(s, total, 0.2) for s in range(total + 1)]
    peak = values.index(max(values))
    assert all(a <= b for a, b in itertools.pairwise(values[: peak + 1]))
    assert all(a >= b for a, b in itertools.pairwise(values[peak:]))


def test_smoothed_nll_equals_cross_entropy_with_label_smoothing():
    logits = torch.randn(16, 10)
    target = torch.randint(0, 10, (16,))
    ours = smoothed_nll_loss(F.log_softmax(logits, 1), target, 0.2)
    assert torch.allclose(ours, F.cross_entropy(logits, target, label_smoothing=0.2), atol=1e-6)
    assert torch.allclose(smoothed_nll_loss(F.log_softmax(logits, 1), target, 0.0), F.cross_entropy(logits, target))


def test_image_folder_and_its_archive_decode_identically(tiny_folder: Path, tmp_path: Path):
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_folder / "train", arcname="cifar/train")
        tar.add(tiny_folder / "test", arcname="cifar/test")
    from_dir = data.decode_image_folder(tiny_folder)
    from_tar = data.decode_image_folder(archive)
    assert from_dir.classes == sorted(from_dir.classes) and len(from_dir.classes) == 10
    assert from_dir.train.images.shape == (60, 3, 32, 32) and from_dir.train.images.dtype == torch.uint8
    assert from_dir.test.images.shape == (30, 3, 32, 32)
    assert torch.equal(from_dir.train.labels.bincount(), torch.full((10,), 6))

    # Same multiset of (image, label) pairs whatever order the archive lists members in.
    def key(split: data.Split) -> list:
        return sorted((int(y), img.flatten().tolist()) for img, y in zip(split.images, split.labels, strict=True))

    assert key(from_dir.train) == key(from_tar.train)
    assert key(from_dir.test) == key(from_tar.test)


def test_prepare_caches_decoded_tensors(tiny_folder: Path, tmp_path: Path):
    first = data.prepare("folder", tiny_folder, tmp_path)
    mtime = first.stat().st_mtime_ns
    assert data.prepare("folder", tiny_folder, tmp_path) == first
    assert first.stat().st_mtime_ns == mtime  # second call read the cache, wrote nothing
    loaded = data.load("folder", tiny_folder, tmp_path)
    assert loaded.classes[0] == "airplane" and len(loaded.train) == 60


def test_validation_split_is_seeded_and_disjoint(tiny_folder: Path, cache_dir: Path):
    cifar = data.load("folder", tiny_folder, cache_dir)
    train_a, val_a = data.train_val_split(cifar.train, 10, seed=3)
    _, val_b = data.train_val_split(cifar.train, 10, seed=3)
    _, val_c = data.train_val_split(cifar.train, 10, seed=4)
    assert torch.equal(val_a.images, val_b.images) and len(val_a) == 10 and len(train_a) == 50
    assert not torch.equal(val_a.labels, val_c.labels) or not torch.equal(val_a.images, val_c.images)
    rows = {tuple(img.flatten().tolist()) for img in train_a.images}
    assert not any(tuple(img.flatten().tolist()) in rows for img in val_a.images)


def test_batch_augmentation_shapes_and_effects():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = TrainTransform()(images)
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    normalized = Normalize()(images)
    assert not torch.equal(out, normalized)
    # A crop is a shifted window of the reflect-padded image: every output row exists in the padded input.
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    cropped = random_crop(x, 2)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    for n in range(2):
        assert any(
            torch.equal(cropped[n, 0], padded[n, 0, dy : dy + 8, dx : dx + 8]) for dy in range(5) for dx in range(5)
        )
    holes = cutout(torch.ones(16, 3, 32, 32), 8)
    zeroed = (holes == 0).all(1).flatten(1).sum(1)
    assert (zeroed > 0).all() and (zeroed <= 64).all()


def test_cutmix_pastes_one_box_from_the_images_whose_labels_it_returns():
    torch.manual_seed(3)
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 32, 32).clone()
    y = torch.arange(8)
    for _ in range(20):
        mixed, pasted_labels, kept = cutmix(x, y)
        for i in range(8):
            if pasted_labels[i] == i:  # the shuffle left this image in place: nothing changed
                assert torch.equal(mixed[i], x[i])
                continue
            own = (mixed[i] == i).float().mean().item()
            assert own == pytest.approx(kept)  # the loss weight is the area really kept
            other = mixed[i][mixed[i] != i]
            assert (other == pasted_labels[i].float()).all()  # the box came from the labelled image


def _module(tiny_folder: Path, cache_dir: Path, **kwargs) -> CifarResNetModule:
    return CifarResNetModule(
        data_dir=str(tiny_folder), cache_dir=str(cache_dir), batch_size=16, val_size=10, epochs=1, **kwargs
    )


def test_fast_dev_run(tiny_folder: Path, cache_dir: Path):
    module = _module(tiny_folder, cache_dir)
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(module)
    assert trainer.state.finished and trainer.global_step == 1
    assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.logged_metrics)
    trainer.test(module)
    assert {"test_loss", "test_acc"} <= set(trainer.logged_metrics)


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_folder: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two short epochs through the real CLI's trainer: checkpoints, CSV logs, resumable last.ckpt."""
    from training.cli import build_trainer

    run_dir = tmp_path_factory.mktemp("run")
    L.seed_everything(0)
    module = _module(tiny_folder, cache_dir, lr=0.05)
    trainer = build_trainer(run_dir, epochs=2, precision="32-true", progress_bar=False)
    trainer.fit(module)
    return module, run_dir / "checkpoints" / "last.ckpt", run_dir


@pytest.mark.slow  # Lightning fits
def test_fit_writes_resumable_checkpoints_and_logs(trained_checkpoint):
    _, last, run_dir = trained_checkpoint
    assert last.is_file()
    assert len(list((run_dir / "checkpoints").glob("epoch*.ckpt"))) == 2
    assert list(run_dir.glob("logs/*/metrics.csv"))
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["camserve"]["trained_epochs"] == 2
    assert ckpt["camserve"]["train_seconds"] > 0
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]


@pytest.mark.slow  # Lightning fits
def test_checkpoint_and_bundle_give_the_same_predictions(trained_checkpoint, tiny_folder, cache_dir, tmp_path):
    module, last, _ = trained_checkpoint
    images = data.load("folder", tiny_folder, cache_dir).test.images
    module.eval()
    with torch.no_grad():
        in_memory = module(module.test_transform(images))
    restored = CifarResNetModule.load_from_checkpoint(last, map_location="cpu").eval()
    with torch.no_grad():
        from_checkpoint = restored(restored.test_transform(images))
    assert torch.equal(in_memory.argmax(1), from_checkpoint.argmax(1))
    assert torch.allclose(in_memory, from_checkpoint, atol=1e-5)

    bundle_path = export_bundle(last, tmp_path / "bundle", cache_dir=str(cache_dir), misclassified=5)
    bundle = load_bundle(bundle_path)
    from_bundle = F.log_softmax(view_logits(bundle.model, images)[0], 1)
    assert torch.equal(from_bundle.argmax(1), in_memory.argmax(1))
    assert torch.allclose(from_bundle, in_memory, atol=1e-4)

    meta = bundle.metadata
    test_acc = float((in_memory.argmax(1) == data.load("folder", tiny_folder, cache_dir).test.labels).float().mean())
    assert meta["test_accuracy"] == pytest.approx(test_acc, abs=1e-4)
    assert meta["trained_epochs"] == 2
    assert set(meta["per_class_accuracy"]) == set(meta["classes"])
    assert sum(map(sum, meta["confusion_matrix"])) == len(images)
    assert 0 < len(meta["misclassified"]) <= 5
    for entry in meta["misclassified"]:
        assert (bundle_path / entry["file"]).is_file()
        assert entry["true_label"] != entry["predicted_label"]
    assert meta["gradcam"]["default_layer"] == "layer2"
    assert meta["recipe"]["precision"] == "32-true"  # what the run used, read from its checkpoint
    assert "bf16" in meta["precision_agreement"]
    # The run held 10 images out: export fits the temperature on them and reports it on the test set.
    assert meta["calibration"]["fitted_on"]["images"] == 10 and meta["calibration"]["temperature"] > 0
    assert meta["calibration"]["test"]["flip"]["after"]["images"] == len(images)
    assert bundle.temperature == meta["calibration"]["temperature"]


@pytest.mark.slow  # Lightning fits
def test_cli_fit_resumes_from_last_checkpoint(tiny_folder, cache_dir, tmp_path):
    from training.cli import main

    def fit(epochs: int) -> dict:
        main(
            [
                "fit",
                "--data-dir",
                str(tiny_folder),
                "--cache-dir",
                str(cache_dir),
                "--run-dir",
                str(tmp_path),
                "--epochs",
                str(epochs),
                "--batch-size",
                "16",
                "--val-size",
                "10",
                "--precision",
                "32-true",
            ]
        )
        return torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)

    before = fit(1)  # as if interrupted after one epoch
    after = fit(2)
    assert before["camserve"]["trained_epochs"] == 1 and after["camserve"]["trained_epochs"] == 2
    assert after["global_step"] == 2 * before["global_step"]  # one more epoch, not two
    assert after["camserve"]["train_seconds"] > before["camserve"]["train_seconds"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "last.ckpt"


@pytest.mark.slow  # Lightning fits
def test_cli_test_and_export_commands(trained_checkpoint, cache_dir, tmp_path, capsys):
    from training.cli import main

    _, last, _ = trained_checkpoint
    main(["test", str(last), "--cache-dir", str(cache_dir), "--precision", "32-true"])
    assert "test_acc" in capsys.readouterr().out
    main(
        ["export", str(last), "--cache-dir", str(cache_dir), "--out", str(tmp_path / "bundle"), "--misclassified", "3"]
    )
    assert load_bundle(tmp_path / "bundle").metadata["trained_epochs"] == 2


@pytest.mark.server  # the sweep runs each variant as a `python -m training fit` process
def test_sweep_sizes_runs_to_its_budget_and_keeps_the_best_by_validation(tiny_folder, cache_dir, tmp_path):
    from training.sweep import main as sweep

    root = tmp_path / "sweep"
    common = "--batch-size 16 --val-size 10 --precision 32-true --lr 0.05"
    sweep(
        [
            *("--data-dir", str(tiny_folder), "--cache-dir", str(cache_dir), "--run-root", str(root)),
            *("--budget-s", "240", "--calibration-epochs", "1", "--max-epochs", "1", "--common", common),
            *("--variant", "plain=", "--variant", "mixed=--cutmix 1.0 --cutout-size 0"),
        ]
    )
    summary = json.loads((root / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["seconds_per_epoch_calibrated"] > 0
    runs = {v["name"]: v for v in summary["variants"]}
    assert set(runs) == {"plain", "mixed"} and all(v["returncode"] == 0 for v in runs.values())
    best = max(runs.values(), key=lambda v: v["metrics"]["val_acc"])
    assert summary["best"] == best["name"]

    slim = torch.load(root / "best.ckpt", map_location="cpu", weights_only=False)
    assert "optimizer_states" not in slim and slim["camserve"]["trained_epochs"] == 1
    # The reported test accuracy is the best checkpoint's, counted again here image by image.
    restored = CifarResNetModule.load_from_checkpoint(root / "best.ckpt", map_location="cpu").eval()
    test = data.load("folder", tiny_folder, cache_dir).test
    with torch.no_grad():
        predicted = restored(restored.test_transform(test.images)).argmax(1)
    correct = int((predicted == test.labels).sum())
    assert best["metrics"]["test_acc"] == pytest.approx(correct / len(test.labels), abs=1e-6)
    restored = CifarResNetModule.load_from_checkpoint(root / "best.ckpt", map_location="cpu").eval()
    full = CifarResNetModule.load_from_checkpoint(
        root / best["name"] / "checkpoints" / "last.ckpt", map_location="cpu"
    ).eval()
    assert restored.hparams.cutmix == full.hparams.cutmix
    images = data.load("folder", tiny_folder, cache_dir).test.images
    with torch.no_grad():
        assert torch.equal(restored(restored.test_transform(images)), full(full.test_transform(images)))


def test_ghost_batch_norm_normalises_each_virtual_batch_and_stays_plain_batch_norm():
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(8)
    torch.nn.init.uniform_(plain.weight)
    torch.nn.init.uniform_(plain.bias)
    ghost = GhostBatchNorm2d(8, virtual_batch_size=4)
    ghost.load_state_dict(plain.state_dict())
    x = torch.randn(16, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    out = ghost(x)
    expected, means, variances = torch.empty_like(x), [], []
    for j in range(4):  # virtual batch j holds images j, j+4, j+8, j+12
        reference = copy.deepcopy(plain)
        expected[j::4] = reference(x[j::4])
        means.append(reference.running_mean)
        variances.append(reference.running_var)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, copy.deepcopy(plain)(x), atol=1e-3)  # not whole-batch statistics
    assert torch.allclose(ghost.running_mean, torch.stack(means).mean(0), atol=1e-6)
    assert torch.allclose(ghost.running_var, torch.stack(variances).mean(0), atol=1e-6)
    ghost.eval()
    plain.load_state_dict(ghost.state_dict())
    assert torch.equal(ghost(x), plain.eval()(x))  # evaluation: plain BatchNorm, same state


@pytest.mark.slow  # Lightning fits
def test_ghost_batch_norm_and_ema_train_a_network_the_service_loads(tiny_folder, cache_dir, tmp_path):
    from training.cli import main

    run_dir = tmp_path / "run"
    common = ["--data-dir", str(tiny_folder), "--cache-dir", str(cache_dir), "--run-dir", str(run_dir)]
    common += ["--batch-size", "16", "--val-size", "10", "--precision", "32-true", "--lr", "0.05"]
    main(["fit", *common, "--epochs", "2", "--ghost-batch-size", "8", "--ema-decay", "0.5"])
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == current.keys()
    assert any(not torch.equal(averaged[k], current[k]) for k in averaged if k.startswith("net."))

    module = CifarResNetModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    assert any(isinstance(m, GhostBatchNorm2d) for m in module.net.modules())
    bundle = load_bundle(export_bundle(run_dir / "checkpoints" / "last.ckpt", tmp_path / "bundle", misclassified=2))
    served = bundle.model.state_dict()  # the averaged weights, in the plain serving network
    assert all(torch.equal(served[k], averaged[f"net.{k}"]) for k in served)
    assert bundle.metadata["recipe"]["ema_decay"] == 0.5 and bundle.metadata["recipe"]["ghost_batch_size"] == 8

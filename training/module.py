"""The LightningModule: the network, its data, its loss, optimiser and schedule."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from camcore.network import build_network
from camcore.preprocess import CIFAR10_MEAN, CIFAR10_STD, Normalize
from training import data
from training.augment import TrainTransform, cutmix
from training.ghost_norm import use_ghost_batch_norm
from training.schedule import custom_one_cycle_lr


def smoothed_nll_loss(log_probs: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``F.nll_loss`` with label smoothing: (1 - e) * NLL + e * mean over classes of -log p.

    Equal to ``F.cross_entropy(logits, target, label_smoothing=e)``; written on log-probabilities
    because the module's ``forward`` returns ``log_softmax``.
    """
    nll = F.nll_loss(log_probs, target)
    if smoothing == 0.0:
        return nll
    return (1.0 - smoothing) * nll + smoothing * (-log_probs.mean(dim=1)).mean()


def hardware_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (CPU)"


class CifarResNetModule(L.LightningModule):
    def __init__(
        self,
        lr: float = 0.4,
        data_dir: str = "data",
        source: data.Source = "folder",
        batch_size: int = 512,
        epochs: int = 24,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.2,
        warmup_fraction: float = 0.2,
        val_size: int = 5000,
        seed: int = 0,
        crop_padding: int = 4,
        cutout_size: int = 8,
        cutmix: float = 0.0,
        ghost_batch_size: int = 0,
        ema_decay: float = 0.0,
        num_classes: int = 10,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.net = build_network(num_classes).to(memory_format=torch.channels_last)
        if ghost_batch_size:
            use_ghost_batch_norm(self.net, ghost_batch_size)
        # ema_decay is read by the Trainer's EMAWeightAveraging callback (training.cli); kept here so
        # the checkpoint records the whole recipe.
        self.train_transform = TrainTransform(CIFAR10_MEAN, CIFAR10_STD, crop_padding, cutout_size)
        self.test_transform = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.classes: list[str] = []
        self.train_seconds = 0.0  # wall time of fit, summed over resumed runs; saved in checkpoints
        self._fit_started: float | None = None
        self._last_epoch_end: float | None = None
        self.provenance: dict[str, Any] = {}  # what the last loaded checkpoint said about its training

    # -- model ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.net(x).float(), dim=1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        smoothing = self.hparams.label_smoothing
        if self.hparams.cutmix > 0 and torch.rand(()).item() < self.hparams.cutmix:
            x, y_pasted, kept = cutmix(x, y)
            log_probs = self(x)
            loss = kept * smoothed_nll_loss(log_probs, y, smoothing) + (1 - kept) * smoothed_nll_loss(
                log_probs, y_pasted, smoothing
            )
        else:
            log_probs = self(x)
            loss = smoothed_nll_loss(log_probs, y, smoothing)
        self.train_acc(log_probs, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        log_probs = self(x)
        metric(log_probs, y)
        self.log(f"{stage}_loss", F.nll_loss(log_probs, y), prog_bar=True, sync_dist=True)  # mean over processes
        self.log(f"{stage}_acc", metric, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self) -> dict[str, Any]:
        # No weight decay on BatchNorm parameters: decaying their scale fights the normalisation.
        decay = [p for p in self.net.parameters() if p.ndim > 1]
        no_decay = [p for p in self.net.parameters() if p.ndim <= 1]
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            nesterov=self.hparams.nesterov,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.hparams.warmup_fraction
        scheduler = LambdaLR(optimizer, lambda step: custom_one_cycle_lr(step, total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- data ----------------------------------------------------------------------------------
    def _cache_dir(self) -> Path | None:
        return Path(self.hparams.cache_dir) if self.hparams.cache_dir else None

    def prepare_data(self) -> None:
        data.prepare(self.hparams.source, self.hparams.data_dir, self._cache_dir())

    def setup(self, stage: str) -> None:
        cifar = data.load(self.hparams.source, self.hparams.data_dir, self._cache_dir())
        if len(cifar.classes) != self.num_classes:
            raise ValueError(f"{self.hparams.data_dir}: {len(cifar.classes)} classes, model has {self.num_classes}")
        self.classes = cifar.classes
        self.train_split, self.val_split = data.train_val_split(cifar.train, self.hparams.val_size, self.hparams.seed)
        self.test_split = cifar.test

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return data.batch_loader(self.train_split, self.hparams.batch_size, shuffle=True, seed=self.hparams.seed)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return data.batch_loader(self.val_split, self.hparams.batch_size, shuffle=False)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return data.batch_loader(self.test_split, self.hparams.batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment/normalise on the batch's device (the GPU when training there), whole batch at once."""
        images, labels = batch
        training = self._trainer is not None and self.trainer.training
        transform = self.train_transform if training else self.test_transform
        return transform(images), labels

    # -- provenance ----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        # Wall time per epoch (training, validation, checkpointing) in the CSV log: how a sweep sizes
        # its runs to a time budget, and what a user compares across machines.
        now = time.perf_counter()
        previous = self._last_epoch_end or self._fit_started
        self._last_epoch_end = now
        if previous is not None:
            self.log("epoch_seconds", now - previous)

    def on_fit_end(self) -> None:
        self.train_seconds = self._elapsed_train_seconds()
        self._fit_started = None

    def _elapsed_train_seconds(self) -> float:
        running = 0.0 if self._fit_started is None else time.perf_counter() - self._fit_started
        return self.train_seconds + running

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Saved at the end of an epoch's validation, so "epoch" + 1 epochs are done.
        checkpoint["camserve"] = {
            "classes": self.classes,
            "train_seconds": self._elapsed_train_seconds(),
            "trained_epochs": int(checkpoint.get("epoch", -1)) + 1,
            "hardware": hardware_description(),
            "precision": str(self.trainer.precision),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("camserve", {})
        self.provenance = dict(extra)
        self.classes = list(extra.get("classes", []))
        self.train_seconds = float(extra.get("train_seconds", 0.0))

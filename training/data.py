"""CIFAR-10 as uint8 tensors: decoded once, cached, then indexed a whole batch at a time.

Two sources behind one switch:

* ``folder``: an image folder ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``, given either as
  the directory or as a ``.tar.gz`` of it (the shared archive is read without extracting it);
* ``torchvision``: ``torchvision.datasets.CIFAR10(download=True)`` for machines with internet.

Per-image PIL pipelines starve a 2-core CPU; decoding once into one uint8 tensor and augmenting
whole batches (see :mod:`training.augment`) keeps the model busy.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from camcore.preprocess import image_to_uint8

Source = Literal["folder", "torchvision"]
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 (N, 3, 32, 32)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Cifar:
    train: Split
    test: Split
    classes: list[str]


def default_cache_dir() -> Path:
    return Path(os.environ.get("CAMSERVE_CACHE_DIR", "~/.cache/camserve")).expanduser()


def _iter_folder(root: Path) -> Iterator[tuple[str, str, bytes]]:
    for split in SPLITS:
        for path in sorted((root / split).glob("*/*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                yield split, path.parent.name, path.read_bytes()


def _iter_tar(archive: Path) -> Iterator[tuple[str, str, bytes]]:
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            # Accept a leading top-level folder: [<top>/]train/<class>/<file>
            if not member.isfile() or len(parts) < 3 or parts[-3] not in SPLITS:
                continue
            if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                yield parts[-3], parts[-2], handle.read()


def decode_image_folder(source: Path) -> Cifar:
    """Decode every image of a folder or archive; classes are the sorted folder names."""
    items = _iter_tar(source) if source.is_file() else _iter_folder(source)
    decoded: dict[str, list[tuple[str, torch.Tensor]]] = {split: [] for split in SPLITS}
    for split, class_name, payload in items:
        with Image.open(io.BytesIO(payload)) as image:
            decoded[split].append((class_name, image_to_uint8(image)))
    classes = sorted({name for rows in decoded.values() for name, _ in rows})
    if not decoded["train"] or not decoded["test"]:
        raise FileNotFoundError(f"{source}: expected images under train/<class>/ and test/<class>/")
    index = {name: i for i, name in enumerate(classes)}
    splits = {
        split: Split(torch.stack([img for _, img in rows]), torch.tensor([index[n] for n, _ in rows]))
        for split, rows in decoded.items()
    }
    return Cifar(splits["train"], splits["test"], classes)


def download_torchvision(root: Path) -> Cifar:
    from torchvision.datasets import CIFAR10  # training-only dependency

    def to_split(train: bool) -> Split:
        dataset = CIFAR10(root=str(root), train=train, download=True)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return Split(images, torch.tensor(dataset.targets, dtype=torch.int64))

    train = to_split(True)
    return Cifar(train, to_split(False), list(CIFAR10(root=str(root), train=False).classes))


def _cache_path(source: Source, data_dir: Path, cache_dir: Path) -> Path:
    resolved = data_dir.resolve()
    stamp = f"{source}:{resolved}"
    if resolved.is_file():
        stat = resolved.stat()
        stamp += f":{stat.st_size}:{stat.st_mtime_ns}"
    return cache_dir / f"cifar-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.safetensors"


def prepare(source: Source, data_dir: str | Path, cache_dir: Path | None = None) -> Path:
    """Decode the data set once and cache it as safetensors; later calls just return the path."""
    data_dir = Path(data_dir)
    cache_dir = cache_dir or default_cache_dir()
    cache = _cache_path(source, data_dir, cache_dir)
    if cache.is_file():
        return cache
    data = download_torchvision(data_dir) if source == "torchvision" else decode_image_folder(data_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    save_file(
        {
            "train_images": data.train.images,
            "train_labels": data.train.labels,
            "test_images": data.test.images,
            "test_labels": data.test.labels,
        },
        str(tmp),
        metadata={"classes": "\n".join(data.classes), "source": f"{source}:{data_dir}"},
    )
    tmp.replace(cache)
    return cache


def load(source: Source, data_dir: str | Path, cache_dir: Path | None = None) -> Cifar:
    cache = prepare(source, data_dir, cache_dir)
    from safetensors import safe_open

    with safe_open(str(cache), framework="pt") as handle:
        classes = (handle.metadata() or {})["classes"].split("\n")
    tensors = load_file(str(cache))
    return Cifar(
        Split(tensors["train_images"], tensors["train_labels"]),
        Split(tensors["test_images"], tensors["test_labels"]),
        classes,
    )


def train_val_split(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """A seeded hold-out of the training set; the test set stays untouched for the final number."""
    if not 0 <= val_size < len(train):
        raise ValueError(f"val_size {val_size} must be in [0, {len(train)})")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[val_size:]), train.subset(order[:val_size])


class BatchDataset(torch.utils.data.Dataset):
    """Indexed by a *list* of indices, returning a whole batch: no per-image collate on 2 cores."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(index)
        return self.split.images[rows], self.split.labels[rows]


def batch_loader(split: Split, batch_size: int, *, shuffle: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    dataset = BatchDataset(split)
    if shuffle:
        sampler: torch.utils.data.Sampler = torch.utils.data.RandomSampler(
            dataset, generator=torch.Generator().manual_seed(seed)
        )
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    batches = torch.utils.data.BatchSampler(sampler, batch_size=batch_size, drop_last=shuffle)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=batches)

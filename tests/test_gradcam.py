"""Our batched Grad-CAM against an independent implementation (pytorch-grad-cam's GradCAM)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from camcore.bundle import load_bundle
from camcore.cam import class_activation_maps
from camcore.forward import ServedForward
from service.api.render import colorize, overlay

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "cifar10-resnet"


def _model_and_images(bundle_dir: Path, count: int = 8):
    """The shipped trained model when present (realistic maps), else the untrained test bundle."""
    bundle = load_bundle(SHIPPED if (SHIPPED / "model.json").is_file() else bundle_dir)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8)
    misclassified = bundle.metadata.get("misclassified", [])
    if misclassified:
        from PIL import Image

        from camcore.preprocess import image_to_uint8

        real = [image_to_uint8(Image.open(bundle.path / m["file"])) for m in misclassified[:count]]
        images[: len(real)] = torch.stack(real)
    forward = ServedForward.from_bundle(bundle)
    return forward, images, forward.normalize(images)


def _reference(model, x, layer: str, targets: list[int]) -> np.ndarray:
    reference_model = copy.deepcopy(model).float().requires_grad_(True)  # the package needs weight grads on
    with pytorch_grad_cam.GradCAM(model=reference_model, target_layers=[getattr(reference_model, layer)]) as cam:
        return cam(input_tensor=x.contiguous(), targets=[ClassifierOutputTarget(t) for t in targets])


@pytest.mark.parametrize("layer", ["layer1", "layer2", "layer3"])
def test_batched_gradcam_matches_pytorch_grad_cam(bundle_dir, layer):
    forward, images, x = _model_and_images(bundle_dir)
    ours = class_activation_maps(forward, images, layer, [None] * len(images))
    targets = ours.targets.tolist()
    reference = _reference(forward.model, x, layer, targets)
    assert reference.shape == tuple(ours.heatmaps.shape)
    for i in range(len(x)):
        a, b = ours.heatmaps[i].numpy().ravel(), reference[i].ravel()
        if b.std() < 1e-6 and a.std() < 1e-6:  # both flat (all-negative evidence): nothing to correlate
            continue
        assert np.corrcoef(a, b)[0, 1] >= 0.99, f"image {i}, layer {layer}"


def test_each_image_gets_its_own_target(bundle_dir):
    forward, images, x = _model_and_images(bundle_dir, count=4)
    batched = class_activation_maps(forward, images, "layer2", [0, 3, None, 9])
    with torch.no_grad():
        predicted = forward.model(x).argmax(1)
    assert batched.targets.tolist() == [0, 3, int(predicted[2]), 9]
    for i in range(4):  # batching does not mix images: each row equals the single-image map
        alone = class_activation_maps(forward, images[i : i + 1], "layer2", [batched.targets.tolist()[i]])
        assert torch.allclose(alone.heatmaps[0], batched.heatmaps[i], atol=1e-4)


def test_gradcam_leaves_weights_without_gradients(bundle_dir):
    forward, images, _ = _model_and_images(bundle_dir, count=2)
    class_activation_maps(forward, images, "layer2", [None, None])
    assert all(p.grad is None for p in forward.model.parameters())


def test_unknown_layer_is_a_key_error(bundle_dir):
    forward, images, _ = _model_and_images(bundle_dir, count=1)
    with pytest.raises(KeyError, match="valid"):
        class_activation_maps(forward, images, "head", [None])


def test_overlay_blends_and_colormap_is_monotone_in_lightness():
    image = np.full((4, 4, 3), 200, dtype=np.uint8)
    heat = np.linspace(0, 1, 16).reshape(4, 4)
    assert np.array_equal(overlay(image, heat, 0.0), image)
    assert np.array_equal(overlay(image, heat, 1.0), colorize(heat))
    colours = colorize(np.linspace(0, 1, 32)).astype(float)
    lightness = colours @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(lightness) > 0)  # viridis: dark to light, readable without hue

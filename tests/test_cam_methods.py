"""Every CAM method and the ROAD score against pytorch-grad-cam, the independent implementation.

The maps are compared on real test images with the shipped model (an untrained network's maps are
noise, which any two implementations can agree or disagree on by chance); the imputation and the
removal masks are compared exactly, on any input.
"""

from __future__ import annotations

import copy
import io
from typing import get_args

import numpy as np
import pytest
import torch
from conftest import SHIPPED_BUNDLE, shared_cifar_archive
from helpers import real_test_slice
from PIL import Image

from camcore.bundle import load_bundle
from camcore.cam import class_activation_maps
from camcore.cam_methods import METHODS, MethodName
from camcore.forward import ServedForward
from camcore.imputation import linear_impute
from camcore.preprocess import image_to_uint8
from camcore.road import PERCENTILES, removal_masks, road_scores

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.metrics.perturbation_confidence import (  # noqa: E402
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, ROADCombined  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget  # noqa: E402

PACKAGE_CLASSES = {
    "gradcam": pytorch_grad_cam.GradCAM,
    "hirescam": pytorch_grad_cam.HiResCAM,
    "gradcampp": pytorch_grad_cam.GradCAMPlusPlus,
    "xgradcam": pytorch_grad_cam.XGradCAM,
    "layercam": pytorch_grad_cam.LayerCAM,
}
LAYERS = ("prep", "layer1", "layer2", "layer3")


@pytest.fixture(scope="module")
def real_images() -> torch.Tensor:
    """Three test JPEGs per class from the shared archive, decoded as the service decodes uploads."""
    archive = shared_cifar_archive()
    if archive is None or not (SHIPPED_BUNDLE / "model.json").is_file():
        pytest.skip("needs the shared CIFAR-10 archive and the shipped bundle")
    rows = real_test_slice(archive, per_class=3)
    return torch.stack([image_to_uint8(Image.open(io.BytesIO(data))) for _, data, _ in rows])


@pytest.fixture(scope="module")
def shipped() -> ServedForward:
    if not (SHIPPED_BUNDLE / "model.json").is_file():
        pytest.skip("needs the shipped bundle")
    bundle = load_bundle(SHIPPED_BUNDLE)  # fp32, no TTA, no temperature: the package's setting (and ROAD's)
    return ServedForward(bundle.model, bundle.mean, bundle.std)


def test_the_query_parameter_lists_exactly_the_methods():
    assert set(get_args(MethodName)) == set(METHODS) == set(PACKAGE_CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_matches_pytorch_grad_cam_on_every_layer(method, real_images, shipped):
    x = shipped.normalize(real_images).contiguous()
    reference_model = copy.deepcopy(shipped.model).float().requires_grad_(True)  # the package needs weight grads
    for layer in LAYERS:
        ours = class_activation_maps(shipped, real_images, layer, [None] * len(real_images), method)
        targets = ours.targets.tolist()
        with PACKAGE_CLASSES[method](model=reference_model, target_layers=[getattr(reference_model, layer)]) as cam:
            reference = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
        correlations = []
        for i in range(len(x)):
            a, b = ours.heatmaps[i].numpy().ravel(), reference[i].ravel()
            if a.std() < 1e-6 and b.std() < 1e-6:  # both flat (no positive evidence): nothing to correlate
                continue
            correlations.append(np.corrcoef(a, b)[0, 1])
        assert len(correlations) >= len(x) // 2, f"{method} {layer}: most maps flat"
        assert np.mean(correlations) >= 0.99, f"{method} {layer}: mean r {np.mean(correlations):.4f}"
        assert min(correlations) >= 0.9, f"{method} {layer}: worst r {min(correlations):.4f}"


def test_a_batch_of_mixed_methods_equals_each_method_alone(bundle_dir):
    forward = ServedForward.from_bundle(load_bundle(bundle_dir))
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    methods = ["layercam", "gradcam", "gradcampp", "hirescam", "xgradcam"]
    mixed = class_activation_maps(forward, images, "layer1", [1, 2, 3, 4, 5], methods)
    for i, method in enumerate(methods):
        alone = class_activation_maps(forward, images[i : i + 1], "layer1", [i + 1], method)
        assert torch.allclose(alone.heatmaps[0], mixed.heatmaps[i], atol=1e-5), method


def test_an_unknown_method_is_a_key_error(bundle_dir):
    forward = ServedForward.from_bundle(load_bundle(bundle_dir))
    with pytest.raises(KeyError, match="valid"):
        class_activation_maps(forward, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "layer2", [None], "scorecam")


def _smooth_heatmaps(count: int, seed: int) -> np.ndarray:
    """CAM-like maps: coarse noise upsampled, some with plateaus (ties at the minimum) as ReLU makes."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, 8, 8, generator=generator) - 0.3 * torch.arange(count).view(-1, 1, 1, 1) / count
    maps = torch.nn.functional.interpolate(coarse.clamp_min(0), size=(32, 32), mode="bilinear", align_corners=False)
    maps = maps.squeeze(1)
    flat = maps.flatten(1)
    return ((maps - flat.min(1).values.view(-1, 1, 1)) / (flat.max(1).values.view(-1, 1, 1) + 1e-7)).numpy()


def test_removal_masks_are_the_packages():
    heat = _smooth_heatmaps(6, seed=2)
    ours = removal_masks(heat)

    class Capture:  # stands in for the imputer: records the mask the package's removal hands it
        def __call__(self, image, mask):
            self.mask = mask.numpy() > 0.5
            return image

    capture = Capture()
    for i in range(len(heat)):
        for order, removal in enumerate((RemoveMostRelevantFirst, RemoveLeastRelevantFirst)):
            for j, percentile in enumerate(PERCENTILES):
                removal(percentile, capture)(torch.zeros(3, 32, 32), torch.from_numpy(heat[i]))
                assert np.array_equal(capture.mask, ours[i, order, j]), (i, order, percentile)


def test_linear_imputation_solves_the_packages_system():
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    keep = torch.rand(8, 32, 32, generator=generator) < torch.linspace(0.05, 0.95, 8).view(-1, 1, 1)
    keep[0] = False  # nothing kept: the package's solve returns zeros
    keep[1] = True  # nothing removed
    keep[2] = torch.rand(32, 32, generator=generator) < 0.5  # a scattered mask
    keep[3, 8:24, 8:24] = False  # a big hole
    ours = linear_impute(images, keep)
    reference = NoisyLinearImputer(noise=0.0)
    for i in range(len(images)):
        expected = reference(images[i], keep[i].float())
        assert torch.allclose(ours[i], expected, atol=1e-5), i
    assert torch.equal(ours[keep.unsqueeze(1).expand_as(images)], images[keep.unsqueeze(1).expand_as(images)])


@pytest.mark.slow
def test_road_agrees_with_the_packages_roadcombined(real_images, shipped):
    images = real_images[::3]  # one per class
    out = class_activation_maps(shipped, images, "layer2", [None] * len(images))
    ours = road_scores(shipped, images, out.heatmaps, out.targets)
    torch.manual_seed(0)  # the package's imputer adds noise of std 0.01
    reference = ROADCombined()(
        shipped.normalize(images).contiguous(),
        out.heatmaps.numpy(),
        [ClassifierOutputSoftmaxTarget(t) for t in out.targets.tolist()],
        shipped.model,
    )
    assert np.abs(ours - reference).max() <= 0.03, np.abs(ours - reference)


def test_road_refuses_a_forward_with_tta_or_temperature(bundle_dir):
    bundle = load_bundle(bundle_dir)
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    for forward in (
        ServedForward(bundle.model, bundle.mean, bundle.std, tta="flip"),
        ServedForward(bundle.model, bundle.mean, bundle.std, temperature=1.5),
    ):
        with pytest.raises(ValueError, match="plain network"):
            road_scores(forward, images, torch.zeros(1, 32, 32), [0])


@pytest.mark.slow
def test_a_random_heatmap_scores_near_zero_and_the_true_one_higher(real_images, shipped):
    """ROAD's own sanity check: a map that knows nothing is worth about nothing on average."""
    out = class_activation_maps(shipped, real_images, "layer2", [None] * len(real_images), "layercam")
    generator = torch.Generator().manual_seed(4)
    noise = torch.rand(len(real_images), 8, 8, generator=generator)
    random_maps = torch.nn.functional.interpolate(noise[:, None], size=(32, 32), mode="bilinear").squeeze(1)
    random_scores = road_scores(shipped, real_images, random_maps, out.targets)
    cam_scores = road_scores(shipped, real_images, out.heatmaps, out.targets)
    assert abs(random_scores.mean()) < 0.05
    assert cam_scores.mean() > random_scores.mean() + 0.05

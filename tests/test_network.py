import copy

import pytest
import torch

from camcore.network import CifarResNet, block_geometry, build_network, count_parameters


def test_blocks_are_named_sequentials_in_forward_order():
    model = build_network()
    assert list(model.blocks) == ["prep", "layer1", "layer2", "layer3"]
    for name, block in model.blocks.items():
        assert isinstance(block, torch.nn.Sequential)
        assert block is getattr(model, name)


def test_forward_returns_the_heads_logits_on_the_pooled_features():
    torch.manual_seed(0)
    model = build_network(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = x
        for block in model.blocks.values():
            features = block(features)
    assert features.shape == (4, 512, 4, 4)
    # Written out: global max-pool, the bias-free linear layer, the 1/8 logit scale; no softmax.
    by_hand = features.amax(dim=(2, 3)) @ model.head[2].weight.T * 0.125
    assert logits.shape == (4, 10)
    assert torch.allclose(logits, by_hand, atol=1e-6)
    # Scores, not probabilities: negative entries, rows that do not sum to 1.
    assert (logits < 0).any() and not torch.allclose(logits.sum(1), torch.ones(4), atol=1e-3)


def test_parameter_count_matches_the_architecture():
    # conv weights (3x3) and BN (2 per channel) of each conv, plus the bias-free linear head.
    convs = [(3, 64), (64, 128), (128, 128), (128, 128), (128, 256), (256, 512), (512, 512), (512, 512)]
    expected = sum(9 * i * o + 2 * o for i, o in convs) + 512 * 10
    assert count_parameters(build_network()) == expected


def _dense_copy(model: CifarResNet) -> CifarResNet:
    """Same geometry, but every input pixel in the window gets a gradient: max-pool -> avg-pool, no ReLU."""
    model = copy.deepcopy(model)
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, torch.nn.MaxPool2d):
                setattr(parent, child_name, torch.nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
            elif isinstance(child, torch.nn.ReLU):
                setattr(parent, child_name, torch.nn.Identity())
    return model


def _empirical_receptive_field(model: CifarResNet, name: str, size: int = 32) -> tuple[int, int]:
    """Size of the input region that moves the centre cell of a block's output (by gradient)."""
    model = _dense_copy(model).eval()
    x = torch.randn(1, 3, size, size, requires_grad=True)
    h = x
    for block_name, block in model.blocks.items():
        h = block(h)
        if block_name == name:
            break
    centre = h.shape[-1] // 2
    h[0, :, centre, centre].sum().backward()
    rows = torch.nonzero(x.grad.abs().sum((0, 1)).sum(1)).flatten()
    return h.shape[-1], int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize("name", ["prep", "layer1", "layer2", "layer3"])
def test_geometry_table_matches_gradients(name):
    torch.manual_seed(0)
    model = build_network()
    table = {row.name: row for row in block_geometry(model)}
    output_size, measured = _empirical_receptive_field(model, name)
    assert table[name].output_size == output_size
    # The image's borders clip the measured window at 32 px.
    assert measured == min(table[name].receptive_field, 32)


def test_geometry_table_values_justify_layer2_default():
    rows = {row.name: row for row in block_geometry(build_network())}
    assert [rows[n].output_size for n in ("prep", "layer1", "layer2", "layer3")] == [32, 16, 8, 4]
    assert rows["layer2"].receptive_field < 32 <= rows["layer3"].receptive_field
    assert rows["layer3"].channels == 512

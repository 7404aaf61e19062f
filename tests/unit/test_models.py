import pytest
import torch

from raytrain_ft.config import ModelConfig
from raytrain_ft.models import build_model


@pytest.mark.parametrize(
    "name, shape",
    [
        ("mlp", (1, 8, 8)),
        ("cnn", (1, 16, 16)),
        ("cnn", (3, 32, 32)),
        ("resnet18", (3, 32, 32)),
        ("resnet18", (1, 16, 16)),
        ("resnet50", (3, 32, 32)),
    ],
)
def test_models_produce_logits(name, shape):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), shape, 7)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)


def test_resnet_default_stem_accepts_one_channel():
    model = build_model(ModelConfig(name="resnet18", small_input_stem=False), (1, 64, 64), 10)
    model.eval()
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_same_seed_same_init():
    torch.manual_seed(3)
    a = build_model(ModelConfig(name="cnn"), (1, 16, 16), 10)
    torch.manual_seed(3)
    b = build_model(ModelConfig(name="cnn"), (1, 16, 16), 10)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name, params", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_resnets_are_torchvisions_architecture(name, params):
    """ImageNet shape, 1,000 classes: the parameter counts torchvision publishes for
    resnet18/resnet50(weights=None), and its parameter names (a checkpoint loads either way)."""
    model = build_model(ModelConfig(name=name, small_input_stem=False), (3, 224, 224), 1000)
    assert sum(p.numel() for p in model.parameters()) == params
    names = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "fc.bias"} <= names
    assert "layer2.0.downsample.0.weight" in names and "layer2.0.downsample.1.weight" in names

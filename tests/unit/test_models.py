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

"""Networks built from config: exact parameter counts of the paper's architectures, and real tiny forwards."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from facediff.config import load_config
from facediff.models import build_network, model_output
from facediff.models.info import count_parameters, describe

from conftest import REPO

EXPERIMENTS = REPO / "configs" / "experiments"

# Trainable parameters of each shipped architecture. r3, r5, r6 are the seed paper's Appendix A-A UNets (it
# prints no counts); DiT-Small/Large (and the tiny presets) were measured on diffusers 0.42.
EXPECTED = {
    "unet_r3": ("UNet2DModel", 288_906_627),
    "unet_r5": ("UNet2DModel", 118_793_987),
    "unet_r6": ("UNet2DModel", 166_489_763),
    "dit_small_2k7": ("DiTTransformer2DModel", 31_304_240),
    "dit_large_2k7": ("DiTTransformer2DModel", 138_270_000),
    "tiny_unet": ("UNet2DModel", 1_002_883),
    "tiny_dit": ("DiTTransformer2DModel", 205_424),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_counts(name):
    cfg = load_config(next(EXPERIMENTS.glob(f"*/{name}.yaml")))
    cls, trainable = EXPECTED[name]
    assert describe(cfg) == [{"name": cfg.model.family, "class": cls, "trainable": trainable, "frozen": 0}]


def test_meta_counts_equal_real_counts():
    # describe() builds on the meta device; the counts must be those of a real (CPU) build
    cfg = load_config(EXPERIMENTS / "tiny" / "tiny_dit.yaml")
    assert describe(cfg)[0]["trainable"] == count_parameters(build_network(cfg.model))[0]


def test_count_parameters_splits_frozen():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    net[0].requires_grad_(False)
    assert count_parameters(net) == (8, 15)


@pytest.mark.parametrize("name, cls", [("tiny_unet", UNet2DModel), ("tiny_dit", DiTTransformer2DModel)])
def test_tiny_forward_keeps_shape(name, cls):
    torch.manual_seed(0)
    net = build_network(load_config(next(EXPERIMENTS.glob(f"*/{name}.yaml"))).model)
    assert isinstance(net, cls)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model_output(net, x, torch.tensor([10, 900]))
        assert out.shape == x.shape and torch.isfinite(out).all()
        # a scalar timestep is broadcast over the batch
        assert torch.allclose(model_output(net, x, 10)[0], model_output(net, x, torch.tensor([10, 10]))[0])


def test_dit_label_is_constant_in_train_mode():
    # diffusers would swap the class label for its CFG null label at random in train mode; build_dit turns that off
    net = build_network(load_config(EXPERIMENTS / "tiny" / "tiny_dit.yaml").model).train()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 500])
    with torch.no_grad():
        assert torch.equal(model_output(net, x, t), model_output(net, x, t))


def test_learned_sigma_half_is_dropped():
    cfg = load_config(EXPERIMENTS / "tiny" / "tiny_dit.yaml", ["model.out_channels=6"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model_output(build_network(cfg.model), x, 3).shape == x.shape


def test_unsupported_family_is_named():
    with pytest.raises(ValueError, match=r"'gan'.*\['dit', 'lc_unet', 'unet'\]"):
        build_network(SimpleNamespace(family="gan"))


def test_info_cli_prints_counts_and_json():
    from typer.testing import CliRunner

    from facediff.cli.main import app

    path = str(REPO / "configs" / "experiments" / "celebamask" / "unet_r5.yaml")
    text = CliRunner().invoke(app, ["info", path])
    assert text.exit_code == 0 and "118,793,987" in text.output
    as_json = CliRunner().invoke(app, ["info", path, "--json"])
    assert json.loads(as_json.output) == [{"name": "unet", "class": "UNet2DModel", "trainable": 118793987, "frozen": 0}]
    bad = CliRunner().invoke(app, ["info", path, "model.layers_per_blok=3"])
    assert bad.exit_code == 2 and "command line: model.layers_per_blok: unknown key" in bad.output

"""The frozen networks of the mask-aware perceptual loss: LPIPS (lpips' VGG + linear heads) and a face-embedding
network (facenet-pytorch's InceptionResnetV1) whose intermediate layers are read with forward hooks.

Weights (`model.perceptual`): `imagenet` / `vggface2` are the published ones, read from the torch hub cache
(where torchvision and facenet-pytorch put them when they download; facediff itself never downloads), a path is a local
state_dict file (`weights_only=True`), `random` a seeded random init (tests and the tiny demo). Missing weights
raise `WeightsNotFound` naming every place looked. lpips' linear heads ship inside the package and always load.
Both networks are frozen and in eval mode; gradients flow through them to their input only.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from facediff.models.pretrained import WeightsNotFound
from facediff.rng import seeded_build

RANDOM_INIT_SEED = 0
# Where torchvision / facenet-pytorch keep the published weights (file names from their download URLs).
TRUNK_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}
VGGFACE2_FILE = "20180402-114759-vggface2.pt"
VGGFACE2_CLASSES = 8631


def _hub_file(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _read_state_dict(path: Path, what: str, published: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        hint = f" (the published {published} weights; put the file there)" if published else ""
        raise WeightsNotFound(f"{what}: weights not found: looked at {path.resolve()}{hint}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


class FrozenEval(nn.Module):
    """A frozen network that stays in eval mode when its parent trains (no dropout, fixed batch norm)."""

    def train(self, mode: bool = True):
        return super().train(False)


class PerceptualLPIPS(FrozenEval):
    def __init__(self, net: str, trunk: str):
        super().__init__()
        import lpips

        with seeded_build(RANDOM_INIT_SEED), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation of the `pretrained` argument lpips passes
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, spatial=False, verbose=False)
        if trunk != "random":
            self._load_trunk(net, trunk)
        _frozen(self.lpips)

    def _load_trunk(self, net: str, trunk: str) -> None:
        import torchvision.models as tv

        published = trunk == "imagenet"
        path = _hub_file(TRUNK_FILES[net]) if published else Path(trunk).expanduser()
        state = _read_state_dict(path, f"LPIPS {net} trunk", "torchvision ImageNet" if published else None)
        model = {"vgg": tv.vgg16, "alex": tv.alexnet, "squeeze": tv.squeezenet1_1}[net]()
        model.load_state_dict(state)
        # lpips slices torchvision's `features` into stages, keeping each layer's index as its name
        for stage in self.lpips.net.children():
            for index, layer in stage.named_children():
                layer.load_state_dict(model.features[int(index)].state_dict())

    def forward(self, x, y):
        return self.lpips(x, y)

    @property
    def spatial(self) -> bool:
        return self.lpips.spatial

    @spatial.setter
    def spatial(self, value: bool) -> None:
        self.lpips.spatial = value


class FaceFeatures(FrozenEval):
    """`face_features(crops) -> {layer: activation}` of InceptionResnetV1 for crops in [-1, 1] (its own input
    range: facenet-pytorch standardises faces as (x − 127.5) / 128)."""

    def __init__(self, weights: str, layers: list[str]):
        super().__init__()
        from facenet_pytorch import InceptionResnetV1

        with seeded_build(RANDOM_INIT_SEED):
            self.net = InceptionResnetV1(pretrained=None, classify=False, num_classes=VGGFACE2_CLASSES)
        if weights != "random":
            published = weights == "vggface2"
            path = _hub_file(VGGFACE2_FILE) if published else Path(weights).expanduser()
            self.net.load_state_dict(_read_state_dict(path, "face network (InceptionResnetV1)",
                                                      "facenet-pytorch VGGFace2" if published else None))
        _frozen(self.net)
        modules = dict(self.net.named_modules())
        unknown = [name for name in layers if name not in modules]
        if unknown:
            raise ValueError(f"model.perceptual.face_layers: {unknown} are not modules of InceptionResnetV1; "
                             f"choose from {[n for n in modules if n and '.' not in n]}")
        self.layers = list(layers)
        self._captured: dict[str, torch.Tensor] = {}
        for name in self.layers:
            modules[name].register_forward_hook(self._capture(name))
        self.last = max(self.layers, key=list(modules).index)  # the forward can stop after this layer

    def _capture(self, name: str):
        def hook(module, inputs, output):
            self._captured[name] = output
        return hook

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        x = crops
        for name, module in self.net.named_children():  # InceptionResnetV1's forward is this chain, then flatten
            if name in ("logits", "softmax"):
                break
            x = module(x.flatten(1) if name == "last_linear" else x)
            if name == self.last:
                break
        out, self._captured = self._captured, {}
        return out


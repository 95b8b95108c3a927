"""Images for vision models: files → a float batch (N, 3, H, W), with the usual ImageNet preprocessing.

:class:`ImagePrep` says how (resize the shorter side, center crop, scale to [0, 1], normalise by mean / std;
the defaults are torchvision's ImageNet evaluation transform). Decoding is Pillow's.

>>> x = load_images(sample_photos()[:2]); x.shape, x.dtype
(torch.Size([2, 3, 224, 224]), torch.float32)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImagePrep:
    """How an image becomes a model input (torchvision's ImageNet eval transform by default)."""

    resize: int = 256  # the shorter side, before the crop (bilinear)
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def describe(self) -> str:
        return (f"resize shorter side to {self.resize}, center crop {self.crop}, RGB in [0, 1], "
                f"normalised by mean {self.mean} / std {self.std}")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    d = Path(folder)
    if not d.is_dir():
        raise LowbitError(f"{d}: no such image folder")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise LowbitError(f"{d}: no images ({', '.join(SUFFIXES)}) in this folder")
    return files


def load_image(path: str | os.PathLike, prep: ImagePrep = ImagePrep()) -> torch.Tensor:  # noqa: B008
    """One image as a (3, crop, crop) float tensor."""
    from PIL import Image

    p = Path(path)
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = prep.resize / min(w, h)
            im = im.resize((max(prep.crop, round(w * s)), max(prep.crop, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - prep.crop) // 2, (h - prep.crop) // 2
            im = im.crop((left, top, left + prep.crop, top + prep.crop))
            a = np.asarray(im, dtype=np.float32) / 255.0  # (H, W, 3)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LowbitError(f"{p}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    x = torch.from_numpy(a.copy()).permute(2, 0, 1)
    mean, std = torch.tensor(prep.mean).reshape(3, 1, 1), torch.tensor(prep.std).reshape(3, 1, 1)
    return (x - mean) / std


def load_images(files: Sequence[str | os.PathLike] | str | os.PathLike,
                prep: ImagePrep = ImagePrep()) -> torch.Tensor:  # noqa: B008
    """A batch (N, 3, crop, crop) from image files or a folder of them."""
    paths = image_files(files) if isinstance(files, str | os.PathLike) else [Path(f) for f in files]
    if not paths:
        raise LowbitError("no images given")
    return torch.stack([load_image(p, prep) for p in paths])


def sample_photos() -> list[Path]:
    """Real photos that an installed package carries: scikit-image's sample data (its colour photographs and
    scenes; the synthetic test patterns are left out). Empty when scikit-image is not installed."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return []
    d = Path(spec.submodule_search_locations[0]) / "data"
    names = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
             "motorcycle_right.png", "hubble_deep_field.jpg", "camera.png", "brick.png", "grass.png",
             "gravel.png", "horse.png", "moon.png", "coins.png", "cell.png", "page.png", "text.png",
             "clock_motion.png", "retina.jpg", "ihc.png", "color.png", "logo.png")
    return [d / n for n in names if (d / n).is_file()]

"""The ``super_resolution`` model: an ESPCN-style sub-pixel convolution network, trained at build time.

It works on the luma (Y of YCbCr, 0..1) and learns the residual over bicubic upscaling:
``forward(low, bicubic) = bicubic + pixel_shuffle(body(low))``, where ``low`` is the 1 x 1 x h x w luma of the input
and ``bicubic`` its (PIL) bicubic upscaling by ``scale``. The last convolution starts at zero, so the untrained
network is exactly bicubic; any size works (fully convolutional).

Training: random patches of the real photos scikit-image ships (``TRAIN_PHOTOS``), each downscaled by ``scale`` with
PIL's bicubic filter, for a fixed number of steps with a fixed seed (tens of seconds on 2 cores). Evaluation: PSNR
(RGB, 8-bit) of the served pipeline on held-out photos (``HELD_OUT``) against plain bicubic upscaling.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from export.samples import photo

logger = logging.getLogger(__name__)

TRAIN_PHOTOS = ("astronaut", "camera", "rocket", "hubble_deep_field", "immunohistochemistry", "coins", "brick",
                "grass", "gravel", "moon", "retina", "cell", "page", "text", "clock")
HELD_OUT = ("chelsea", "coffee", "china", "flower")


class ESPCN(nn.Module):
    """Shi et al. 2016, narrower: 5x5 conv (32) → 3x3 conv (32) → 3x3 conv (scale²) → pixel shuffle, tanh between."""

    def __init__(self, scale: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.Tanh(), nn.Conv2d(32, 32, 3, padding=1),
                                  nn.Tanh(), nn.Conv2d(32, scale * scale, 3, padding=1))
        self.shuffle = nn.PixelShuffle(scale)
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, low: torch.Tensor, bicubic: torch.Tensor) -> torch.Tensor:
        return bicubic + self.shuffle(self.body(low))


def luma(image: Image.Image) -> Image.Image:
    return image.convert("RGB").convert("YCbCr").getchannel("Y")


def downscale(image: Image.Image, scale: int) -> Image.Image:
    """The image cropped to a multiple of ``scale`` and shrunk by it, bicubic: how the low-resolution input is made."""
    width, height = (image.width // scale) * scale, (image.height // scale) * scale
    return image.crop((0, 0, width, height)).resize((width // scale, height // scale), Image.BICUBIC)


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None, None]


def training_pairs(scale: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(low, bicubic, high) luma tensors of each training photo."""
    pairs = []
    for name in TRAIN_PHOTOS:
        array = photo(name)
        high = luma(Image.fromarray(array if array.ndim == 3 else np.stack([array] * 3, axis=-1)))
        low = downscale(high, scale)
        high = high.crop((0, 0, low.width * scale, low.height * scale))
        pairs.append((as_tensor(low), as_tensor(low.resize(high.size, Image.BICUBIC)), as_tensor(high)))
    return pairs


def train(scale: int, steps: int, batch: int, patch: int, learning_rate: float, seed: int = 0) -> ESPCN:
    """A fresh ESPCN trained on random patches (``patch`` low-resolution pixels square); eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pairs = training_pairs(scale)
    model = ESPCN(scale)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    with tqdm(range(steps), desc="train super_resolution", unit="step", leave=False, disable=None) as progress:
        for _ in progress:
            lows, bicubics, highs = [], [], []
            for index in torch.randint(len(pairs), (batch,), generator=generator).tolist():
                low, bicubic, high = pairs[index]
                y = int(torch.randint(low.shape[2] - patch + 1, (1,), generator=generator))
                x = int(torch.randint(low.shape[3] - patch + 1, (1,), generator=generator))
                lows.append(low[..., y:y + patch, x:x + patch])
                region = (..., slice(y * scale, (y + patch) * scale), slice(x * scale, (x + patch) * scale))
                bicubics.append(bicubic[region])
                highs.append(high[region])
            optimizer.zero_grad()
            loss = F.mse_loss(model(torch.cat(lows), torch.cat(bicubics)), torch.cat(highs))
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.5f}")
    return model.eval()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def held_out(scale: int) -> dict[str, tuple[np.ndarray, bytes]]:
    """name → (the high-resolution photo, cropped to a multiple of scale; its downscaled version as PNG bytes)."""
    photos = {}
    for name in HELD_OUT:
        high = Image.fromarray(photo(name)).convert("RGB")
        low = downscale(high, scale)
        buffer = io.BytesIO()
        low.save(buffer, format="PNG")
        photos[name] = (np.asarray(high.crop((0, 0, low.width * scale, low.height * scale))), buffer.getvalue())
    return photos


def bicubic_upscale(payload: bytes, scale: int) -> np.ndarray:
    low = Image.open(io.BytesIO(payload)).convert("RGB")
    return np.asarray(low.resize((low.width * scale, low.height * scale), Image.BICUBIC))

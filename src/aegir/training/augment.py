"""Per-sample training augmentations beyond the dihedral flips: zoom-out (a coarser ground sample distance),
radiometric jitter and blur — the levers that let a model trained on 0.1 m UAV chips see 0.3 m aerial tiles.

Every function takes one sample, ``image`` (C, H, W) float32 raw pixels (uint8 range for VHR) and ``mask``
(H, W) uint8, and returns the pair with the same shapes. Randomness comes from torch's global generator, which
``lightning.seed_everything`` seeds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _uniform(lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand(()))


def _mirror_index(length: int, size: int, offset: int) -> torch.Tensor:
    """(size,) indices into an axis of ``length`` px that tile it by mirroring (…, 2, 1, 0, 1, 2, …), starting at
    ``offset`` px before its first pixel: the index map of a symmetric pad of any width."""
    period = 2 * length
    index = (torch.arange(size) - offset) % period
    return torch.where(index < length, index, period - 1 - index)


def zoom_out(image: torch.Tensor, mask: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample shrunk by ``factor`` (0 < factor ≤ 1: area resampling of the image, nearest of the mask), then
    mirror-tiled back to its (H, W) with the shrunk sample at a random place: the scene as a sensor with a
    ground sample distance 1 / ``factor`` times coarser would see it, at the same chip size."""
    height, width = mask.shape[-2:]
    small_h, small_w = max(8, round(height * factor)), max(8, round(width * factor))
    if (small_h, small_w) == (height, width):
        return image, mask
    small = F.interpolate(image[None], size=(small_h, small_w), mode="area")[0]
    small_mask = F.interpolate(mask[None, None].float(), size=(small_h, small_w), mode="nearest-exact")[0, 0]
    rows = _mirror_index(small_h, height, int(torch.randint(height - small_h + 1, ())))
    cols = _mirror_index(small_w, width, int(torch.randint(width - small_w + 1, ())))
    return small[:, rows][:, :, cols], small_mask[rows][:, cols].to(mask.dtype)


def color_jitter(image: torch.Tensor, strength: float, max_value: float = 255.0) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by U(1 − s, 1 + s) and every band by U(1 − s/2, 1 + s/2)
    (s = ``strength``), clipped to [0, ``max_value``]."""
    if strength <= 0:
        return image
    gains = torch.tensor([_uniform(1 - strength / 2, 1 + strength / 2) for _ in range(image.shape[0])])
    image = image * gains.view(-1, 1, 1) * _uniform(1 - strength, 1 + strength)
    mean = image.mean()
    image = (image - mean) * _uniform(1 - strength, 1 + strength) + mean
    grey = image.mean(dim=0, keepdim=True)
    image = (image - grey) * _uniform(1 - strength, 1 + strength) + grey
    return image.clamp(0, max_value)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every band (``sigma`` px, reflect padding); ``sigma`` < 0.3 returns the image."""
    if sigma < 0.3:
        return image
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    bands = image.shape[0]
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(bands, 1, 1, 1), groups=bands)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(bands, 1, 1, 1), groups=bands)
    return out[0]


def radiometric_and_scale(image: torch.Tensor, mask: torch.Tensor, scale_range: list[float] | None,
                          jitter: float, blur_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom-out by U(``scale_range``), then blur (half of the samples, sigma U(0, ``blur_sigma``)), then colour
    jitter; ``image`` comes back float32."""
    image = image.float()
    if scale_range:
        image, mask = zoom_out(image, mask, _uniform(*scale_range))
    if blur_sigma > 0 and torch.rand(()) < 0.5:
        image = gaussian_blur(image, _uniform(0.0, blur_sigma))
    return color_jitter(image, jitter), mask

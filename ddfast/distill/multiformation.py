"""Multi-formation (IDC, Kim et al. 2022): one stored image of size H x W holds factor^2 images of
size H/factor x W/factor in a factor x factor grid.

``decode`` splits every stored image into its grid and upsamples each part back to H x W (bilinear,
as the reference), so N stored images give factor^2 * N training images. ``encode`` is IDC's
initialisation: factor^2 real images downsampled (nearest) into the cells of one stored image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_factor(factor: int, height: int, width: int) -> None:
    """``factor`` is an integer >= 1 that divides both sides of the images (``ValueError`` otherwise)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor (options.factor) must be an integer >= 1, got {factor!r}")
    if height % factor or width % factor:
        raise ValueError(f"factor (options.factor) {factor} must divide the image size, got {height} x {width}")


def decode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Stored images (N, C, H, W) -> decoded (N * factor^2, C, H, W), differentiable.

    Decoded row ``n * factor^2 + i * factor + j`` is cell (row i, column j) of stored image n
    upsampled, so a class-major stored set decodes to a class-major training set.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    check_factor(factor, h, w)
    if factor == 1:
        return images
    cells = images.reshape(n, c, factor, h // factor, factor, w // factor).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(n * factor * factor, c, h // factor, w // factor)
    return F.interpolate(cells, size=(h, w), mode="bilinear", align_corners=False)


def encode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Images (N * factor^2, C, H, W) -> stored (N, C, H, W): consecutive groups of factor^2 images,
    each downsampled to (H / factor, W / factor) (nearest) and laid out row by row in one grid."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    m, c, h, w = images.shape
    check_factor(factor, h, w)
    if m % (factor * factor):
        raise ValueError(f"{m} images do not fill whole grids of factor^2 = {factor * factor}")
    small = F.interpolate(images, size=(h // factor, w // factor), mode="nearest")
    grid = small.reshape(m // (factor * factor), factor, factor, c, h // factor, w // factor).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(m // (factor * factor), c, h, w)

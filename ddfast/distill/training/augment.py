"""Differentiable Siamese augmentation (DSA, Zhao & Bilen 2021), in torch.

Each call picks one operation of ``operations`` at random (``color`` = brightness, saturation and
contrast together) and draws its parameters once; every batch passed to the same call gets those
same parameters (Siamese). ``DSA.match`` augments batches that a loss compares (a class's real and
synthetic batch in DM and DC): as in the reference code, one draw serves every sample of every batch
(``pairing="batch"``); ``pairing="sample"`` instead pairs sample i of each batch with draw i, a
departure from the reference. ``DSA.__call__`` augments the batches a network trains on with one
draw per sample. Every operation is differentiable with respect to the images (for fixed parameters
it is linear in them).

Ranges, as in the reference code: scale factors in [1/1.2, 1.2], rotations within +-15 degrees,
translations up to 1/8 of the side (zero fill), a cutout square of half the side, horizontal flips
with probability 1/2, brightness shifts in [-0.5, 0.5], saturation x[0, 2], contrast x[0.5, 1.5].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPERATIONS = ("color", "crop", "cutout", "flip", "scale", "rotate")
PAIRINGS = ("batch", "sample")


@dataclass(frozen=True)
class DSAConfig:
    operations: tuple[str, ...] = OPERATIONS
    scale: float = 1.2  # factors in [1/scale, scale] per axis
    rotate: float = 15.0  # degrees, either way
    crop: float = 0.125  # largest translation, fraction of the side
    cutout: float = 0.5  # side of the erased square, fraction of the side
    flip: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.5  # shift in [-brightness, brightness]
    saturation: float = 2.0  # factor in [0, saturation]
    contrast: float = 0.5  # factor in [1 - contrast, 1 + contrast]
    pairing: str = "batch"  # matched batches: one draw for all samples ("batch"), or draw i for sample i ("sample")

    def __post_init__(self):
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown or not self.operations:
            raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {self.operations}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")


@dataclass
class Draw:
    """The random parameters of one call: the operation and per-sample values, each of shape (n,)."""

    operation: str
    values: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.values.values())))

    def repeat(self, n: int) -> Draw:
        """The first sample's parameters for ``n`` samples."""
        return Draw(self.operation, {k: v[:1].expand(n) for k, v in self.values.items()})


class DSA:
    """``dsa.match(real, syn)`` augments batches a loss compares; ``dsa(x)`` a batch a network trains on.

    Batches are (N, C, H, W) with equal C, H, W; sizes may differ.
    """

    def __init__(self, config: DSAConfig | None = None):
        self.config = config or DSAConfig()

    def __call__(self, *batches: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...] | torch.Tensor:
        """Augment with one draw per sample: sample i of each batch gets draw i."""
        return self._augment(batches, self.draw, generator)

    def match(self, *batches: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...] | torch.Tensor:
        """Augment batches that a loss compares, paired as ``config.pairing`` says."""
        return self._augment(batches, self.match_draw, generator)

    def match_draw(self, n: int, height: int, width: int, *, generator: torch.Generator | None = None) -> Draw:
        """The draw ``match`` makes for batches of up to ``n`` samples: ``apply`` it to each batch."""
        if self.config.pairing == "batch":
            return self.draw(1, height, width, generator=generator).repeat(n)
        return self.draw(n, height, width, generator=generator)

    def _augment(self, batches, draw_for, generator):
        if not batches:
            raise ValueError("DSA needs at least one batch")
        shape = batches[0].shape[1:]
        for i, batch in enumerate(batches):
            if batch.dim() != 4 or batch.shape[1:] != shape:
                raise ValueError(f"batch {i} must be (N, C, H, W) like batch 0 {tuple(shape)}, got {tuple(batch.shape)}")
        draw = draw_for(max(len(b) for b in batches), shape[1], shape[2], generator=generator)
        out = tuple(self.apply(batch, draw) for batch in batches)
        return out if len(out) > 1 else out[0]

    def draw(self, n: int, height: int, width: int, *, generator: torch.Generator | None = None) -> Draw:
        """Pick an operation and draw its parameters for ``n`` samples (on the CPU generator)."""
        c = self.config
        ops = c.operations
        op = ops[int(torch.randint(len(ops), (1,), generator=generator))]

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(n, generator=generator) * (high - low) + low

        if op == "color":
            values = {"brightness": uniform(-c.brightness, c.brightness), "saturation": uniform(0, c.saturation),
                      "contrast": uniform(1 - c.contrast, 1 + c.contrast)}
        elif op == "crop":
            sy, sx = int(height * c.crop + 0.5), int(width * c.crop + 0.5)
            values = {"dy": torch.randint(-sy, sy + 1, (n,), generator=generator), "dx": torch.randint(-sx, sx + 1, (n,), generator=generator)}
        elif op == "cutout":
            ky, kx = int(height * c.cutout + 0.5), int(width * c.cutout + 0.5)
            top = torch.randint(0, height + 1 - ky % 2, (n,), generator=generator) - ky // 2
            left = torch.randint(0, width + 1 - kx % 2, (n,), generator=generator) - kx // 2
            values = {"top": top, "left": left, "ky": torch.full((n,), ky), "kx": torch.full((n,), kx)}
        elif op == "flip":
            values = {"flip": torch.rand(n, generator=generator) < c.flip}
        elif op == "scale":
            values = {"sx": uniform(1 / c.scale, c.scale), "sy": uniform(1 / c.scale, c.scale)}
        else:  # rotate
            limit = c.rotate * math.pi / 180
            values = {"angle": uniform(-limit, limit)}
        return Draw(op, values)

    def apply(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Transform ``x`` (N, C, H, W) with the first N samples' parameters of ``draw``."""
        if len(x) > len(draw):
            raise ValueError(f"the draw has parameters for {len(draw)} samples, the batch has {len(x)}")
        v = {k: t[: len(x)].to(x.device) for k, t in draw.values.items()}
        if draw.operation == "color":
            return _color(x, v["brightness"], v["saturation"], v["contrast"])
        if draw.operation == "crop":
            return _translate(x, v["dy"], v["dx"], pad=int(max(draw.values["dy"].abs().max(), draw.values["dx"].abs().max())))
        if draw.operation == "cutout":
            return _cutout(x, v["top"], v["left"], v["ky"], v["kx"])
        if draw.operation == "flip":
            return torch.where(v["flip"].view(-1, 1, 1, 1), x.flip(3), x)
        if draw.operation == "scale":
            zero = torch.zeros_like(v["sx"])
            return _affine(x, torch.stack([v["sx"], zero, zero, zero, v["sy"], zero], 1))
        cos, sin, zero = v["angle"].cos(), v["angle"].sin(), torch.zeros_like(v["angle"])
        return _affine(x, torch.stack([cos, sin, zero, -sin, cos, zero], 1))



class DSAChain:
    """DSA operations applied one after another, each with its own draw (IDC's augmentation composes
    color, crop and cutout instead of picking one). The same interface as ``DSA``."""

    def __init__(self, operations: tuple[str, ...], pairing: str = "batch"):
        if not operations:
            raise ValueError("operations must name at least one DSA operation")
        self.steps = [DSA(DSAConfig(operations=(op,), pairing=pairing)) for op in operations]

    def __call__(self, *batches: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...] | torch.Tensor:
        return self._chain("__call__", batches, generator)

    def match(self, *batches: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...] | torch.Tensor:
        return self._chain("match", batches, generator)

    def _chain(self, how: str, batches, generator):
        out = batches
        for step in self.steps:
            out = getattr(step, how)(*out, generator=generator)
            out = out if isinstance(out, tuple) else (out,)
        return out if len(out) > 1 else out[0]

def _color(x, brightness, saturation, contrast):
    x = x + brightness.to(x.dtype).view(-1, 1, 1, 1)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * saturation.to(x.dtype).view(-1, 1, 1, 1) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast.to(x.dtype).view(-1, 1, 1, 1) + mean


def _translate(x, dy, dx, pad: int):
    """Shift sample i by (dy_i, dx_i) pixels (|shifts| <= pad), filling with zeros."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = torch.arange(h, device=x.device).view(1, h) + pad - dy.view(n, 1)
    cols = torch.arange(w, device=x.device).view(1, w) + pad - dx.view(n, 1)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)


def _cutout(x, top, left, ky, kx):
    """Zero the square [top, top + ky) x [left, left + kx) of sample i (clipped to the image)."""
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    inside_rows = (rows >= top.view(-1, 1)) & (rows < (top + ky).view(-1, 1))
    inside_cols = (cols >= left.view(-1, 1)) & (cols < (left + kx).view(-1, 1))
    keep = ~(inside_rows.unsqueeze(2) & inside_cols.unsqueeze(1))
    return x * keep.unsqueeze(1).to(x.dtype)


def _affine(x, theta):
    grid = F.affine_grid(theta.to(x.dtype).view(-1, 2, 3), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)

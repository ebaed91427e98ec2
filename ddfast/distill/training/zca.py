"""ZCA whitening of images, fitted on the training split and applied to every split.

MTT whitens CIFAR this way (regularisation 0.1 added to the covariance's eigenvalues): images are
centred by the training mean and multiplied by ``U diag(1 / sqrt(s + eps)) U^T``, where
``U diag(s) U^T`` is the covariance of the flattened training images.
"""

from __future__ import annotations

import torch


class ZCA:
    """``zca(images)`` whitens (N, C, H, W) images; ``zca.invert`` maps whitened images back."""

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor, inverse: torch.Tensor):
        self.mean, self.matrix, self.inverse = mean, matrix, inverse

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float, chunk: int = 4096) -> ZCA:
        """Fit on ``images`` (N, C, H, W); the covariance is accumulated in float64, ``chunk`` rows at a time."""
        if not eps > 0:
            raise ValueError(f"zca regularisation eps must be > 0, got {eps}")
        if len(images) < 2:
            raise ValueError(f"ZCA needs at least 2 images to fit, got {len(images)}")
        flat = images.flatten(1)
        mean = flat.double().mean(0)
        cov = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=images.device)
        for start in range(0, len(flat), chunk):
            centred = flat[start : start + chunk].double() - mean
            cov += centred.T @ centred
        cov /= len(flat) - 1
        values, vectors = torch.linalg.eigh(cov)
        values = values.clamp_min(0) + eps
        matrix = (vectors * values.rsqrt()) @ vectors.T
        inverse = (vectors * values.sqrt()) @ vectors.T
        dtype = images.dtype
        return cls(mean.to(dtype), matrix.to(dtype), inverse.to(dtype))

    def to(self, device: torch.device | str) -> ZCA:
        return ZCA(self.mean.to(device), self.matrix.to(device), self.inverse.to(device))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.flatten(1) - self.mean) @ self.matrix).view_as(images).contiguous()

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        return (images.flatten(1) @ self.inverse + self.mean).view_as(images).contiguous()

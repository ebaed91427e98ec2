"""ZCA whitening: whitened training images have identity covariance (up to the regularisation) and invert back."""

import pytest
import torch

from ddfast.distill.training.zca import ZCA


def test_whitens_and_inverts():
    torch.manual_seed(0)
    mixing = torch.randn(12, 12, dtype=torch.float64)
    images = (torch.randn(4000, 12, dtype=torch.float64) @ mixing + 3).view(4000, 3, 2, 2)
    zca = ZCA.fit(images, eps=1e-6, chunk=1000)
    white = zca(images).flatten(1)
    cov = torch.cov(white.T)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(white.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(zca.invert(zca(images)), images)
    strong = ZCA.fit(images, eps=10.0)
    assert torch.cov(strong(images).flatten(1).T).diagonal().max() < 1  # regularisation shrinks the scale


def test_bad_input():
    with pytest.raises(ValueError, match="eps must be > 0"):
        ZCA.fit(torch.randn(5, 1, 2, 2), eps=0)
    with pytest.raises(ValueError, match="at least 2 images"):
        ZCA.fit(torch.randn(1, 1, 2, 2), eps=0.1)

"""Test-wide set-up: without a GPU, Triton kernels run under the interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before any Triton kernel is defined (ddfast imports them lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Test-wide set-up: without a GPU, Triton kernels run under the interpreter on CPU tensors; the real
datasets are ``$DDFAST_DATA_ROOT``, else ``../shared/data`` beside the checkout when it exists."""

import os
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not os.environ.get("DDFAST_DATA_ROOT") and SHARED_DATA.is_dir():
    os.environ["DDFAST_DATA_ROOT"] = str(SHARED_DATA)

if not torch.cuda.is_available():
    # must be set before any Triton kernel is defined (ddfast imports them lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

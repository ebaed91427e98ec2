"""Regression timings of trajectory_mse on ResNet-18's parameter list (see conftest.py)."""

from benchmarks import trajectory_mse as OP

RESNET18 = next(shape for shape in OP.MODEL_SHAPES if shape["layout"] == "resnet18")
SHAPES = {"cpu": RESNET18, "cuda": RESNET18}


def test_trajectory_mse(run_case):
    run_case()

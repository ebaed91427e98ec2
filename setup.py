"""Optional ahead-of-time build of the compiled kernels in ``csrc/``.

``pip install -e .`` needs neither a GPU nor a compiler: the kernels are then compiled on first use
(ninja, cached). To compile them now instead, into ``ddfast/_lib``, with torch already installed:

    DDFAST_BUILD_EXTENSIONS=1 pip install --no-build-isolation -e .

CUDA sources are built only when a CUDA toolkit is found. Set TORCH_CUDA_ARCH_LIST to choose GPUs.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _extensions():
    if os.environ.get("DDFAST_BUILD_EXTENSIONS", "") in ("", "0"):
        return {}
    from torch.utils import cpp_extension

    from ddfast import _extension

    (ROOT / "ddfast" / "_lib").mkdir(exist_ok=True)
    modules = []
    for source in sorted((ROOT / "csrc").glob("*/*_cpu.cpp")):
        modules.append(cpp_extension.CppExtension(
            f"ddfast._lib.{source.stem}", [str(source.relative_to(ROOT))],
            include_dirs=[str(ROOT / "csrc")], extra_compile_args=_extension.CPU_FLAGS))
    if _extension.cuda_home() is not None:
        cpp_extension.CUDA_HOME = _extension.cuda_home()
        for source in sorted((ROOT / "csrc").glob("*/*_cuda.cu")):
            modules.append(cpp_extension.CUDAExtension(
                f"ddfast._lib.{source.stem}", [str(source.relative_to(ROOT))],
                include_dirs=[str(ROOT / "csrc")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": _extension.CUDA_FLAGS}))
    return {"ext_modules": modules, "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}}


setup(
    # the kernel sources travel with the package so that non-editable installs can build them on first use
    packages=find_packages(include=["ddfast", "ddfast.*"]) + ["ddfast._csrc"],
    package_dir={"ddfast._csrc": "csrc"},
    package_data={"ddfast._csrc": ["**/*.cpp", "**/*.cu", "**/*.h", "**/*.cuh"]},
    **_extensions(),
)

"""Build and load the compiled kernels of ``csrc/``.

Each kernel family is one small extension per device: ``csrc/<family>/<family>_cpu.cpp`` and
``csrc/<family>/<family>_cuda.cu``. A source registers its operators with ``TORCH_LIBRARY`` under
the namespace ``ddfast_<family>_<device>``, so once loaded they are ``torch.ops.ddfast_<name>.*``.

Extensions are built on first use by ``torch.utils.cpp_extension`` (ninja, cached in
``TORCH_EXTENSIONS_DIR``, one folder per extension and torch version) unless ``setup.py`` built them
ahead of time into ``ddfast/_lib``.
A build records its library under a key of everything that shaped it (the sources and headers, the
flags, the torch and Python versions) in ``<cache>/extensions/<name>.json``; a later process whose key
matches loads that library directly, without importing ``cpp_extension`` or running ninja (0.1 s of
a cold first call on a CPU), and builds as before otherwise.
When no compiler is present, ``load`` returns ``None`` (with the reason in ``load_error``) and
the caller falls back to its pure-torch path. ``DDFAST_NO_EXTENSIONS=1`` disables them all.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from ._cache import cache_dir

_PACKAGE = Path(__file__).resolve().parent
_PREBUILT = _PACKAGE / "_lib"
_errors: dict[str, str] = {}

# Compiled for the machine that builds: the CPU kernels use ATen's vector types (csrc/common/cpu_vec.h),
# which pick AVX2 / AVX-512 from the compiler's target. DDFAST_CPU_ARCH overrides (e.g. "x86-64-v3").
CPU_FLAGS = ["-O3", "-fopenmp", f"-march={os.environ.get('DDFAST_CPU_ARCH', 'native')}"]
CUDA_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def csrc_dir() -> Path:
    """The kernel sources: ``csrc/`` of a source checkout, or the copy installed as ``ddfast/_csrc``."""
    for candidate in (_PACKAGE.parent / "csrc", _PACKAGE / "_csrc"):
        if (candidate / "common").is_dir():
            return candidate
    raise FileNotFoundError(f"ddfast's kernel sources are missing (looked in {_PACKAGE.parent / 'csrc'} and {_PACKAGE / '_csrc'})")


def sources(name: str) -> list[Path]:
    """Source files of extension ``name`` (``<family>_cpu`` or ``<family>_cuda``)."""
    family, device = name.rsplit("_", 1)
    suffix = {"cpu": ".cpp", "cuda": ".cu"}[device]
    path = csrc_dir() / family / f"{name}{suffix}"
    if not path.is_file():
        raise FileNotFoundError(f"no source for extension {name!r}: {path}")
    return [path]


def cuda_home() -> str | None:
    """A CUDA toolkit root with headers: $CUDA_HOME / $CUDA_PATH, nvcc's parent, or /usr/local/cuda."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            return os.environ[env]
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "include" / "cuda_runtime.h").is_file():
            return str(root)
    return None


def _cpp_extension():
    # torch logs a warning on import when the machine has nvcc but no GPU; building for one is on purpose.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def build_key(name: str) -> str:
    """A digest of everything that shapes extension ``name``'s library: sources, headers, flags, versions."""
    family = name.rsplit("_", 1)[0]
    root = csrc_dir()
    digest = hashlib.sha256()
    for path in sorted([*(root / "common").iterdir(), *(root / family).iterdir()]):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    settings = [name, torch.__version__, str(torch.version.cuda), sys.version, CPU_FLAGS, CUDA_FLAGS,
                os.environ.get("TORCH_CUDA_ARCH_LIST"), os.environ.get("TORCH_EXTENSIONS_DIR")]
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()


def _record(name: str) -> Path:
    return cache_dir() / "extensions" / f"{name}.json"


def _recorded_library(name: str) -> str | None:
    """The library a previous build of ``name`` with today's key left, if it is still there."""
    try:
        record = json.loads(_record(name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != build_key(name):
        return None
    library = record.get("library")
    try:  # the same file as built: a later build elsewhere may have replaced it
        return library if record.get("stamp") == _stamp(library) else None
    except (OSError, TypeError):
        return None


def _stamp(library: str) -> list[int]:
    status = os.stat(library)
    return [status.st_size, status.st_mtime_ns]


def _remember(name: str, library: str) -> None:
    """Record ``library`` as ``name``'s build for today's key (best effort: a read-only cache only costs speed)."""
    path = _record(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": build_key(name), "library": library, "stamp": _stamp(library)}))
        os.replace(partial, path)
    except OSError:
        pass


def build_directory(name: str) -> Path:
    """Where ninja builds extension ``name``: a folder per torch, CUDA and Python version.

    Versions must not share one: torch 2.14 leaves its build lock file behind, and torch 2.11 waits
    for an existing lock to go away, forever.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or _cpp_extension().get_default_build_root()
    version = f"torch{torch.__version__}-cu{torch.version.cuda}-py{sys.version_info.major}{sys.version_info.minor}"
    path = Path(root) / f"ddfast_{name}" / version
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(name: str, *, verbose: bool = False) -> None:
    """Compile extension ``name`` with ninja (cached) and load it into this process. Raises on failure."""
    cpp_extension = _cpp_extension()
    is_cuda = name.endswith("_cuda")
    include = [str(csrc_dir())]
    if is_cuda:
        home = cuda_home()
        if home is None:
            raise RuntimeError("no CUDA toolkit found (set CUDA_HOME)")
        # cpp_extension fixes its CUDA root at import from `which nvcc`, which can be a wrapper script
        # outside the toolkit; point it at the root that has the headers.
        cpp_extension.CUDA_HOME = home
        os.environ.setdefault("CUDA_HOME", home)
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    library = cpp_extension.load(
        name=f"ddfast_{name}",
        sources=[str(s) for s in sources(name)],
        build_directory=str(build_directory(name)),
        extra_cflags=CPU_FLAGS if not is_cuda else ["-O3"],
        extra_cuda_cflags=CUDA_FLAGS,
        extra_include_paths=include,
        with_cuda=is_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    if isinstance(library, str):  # the library's path (torch returns it for is_python_module=False)
        _remember(name, library)


@functools.cache
def load(name: str):
    """``torch.ops.ddfast_<name>`` once the extension is built and loaded, else ``None``.

    The first failure is reported once as a warning; ``load_error(name)`` tells it afterwards.
    """
    if os.environ.get("DDFAST_NO_EXTENSIONS", "") not in ("", "0"):
        _errors[name] = "disabled by DDFAST_NO_EXTENSIONS"
        return None
    try:
        prebuilt = sorted(_PREBUILT.glob(f"{name}*.so"))
        library = str(prebuilt[0]) if prebuilt else _recorded_library(name)
        if library is not None:
            torch.ops.load_library(library)
        else:
            build(name)
    except Exception as exc:  # no compiler, no toolkit, a failing build: fall back, say why once
        _errors[name] = f"{type(exc).__name__}: {exc}".strip()
        warnings.warn(f"ddfast: compiled extension {name!r} unavailable, using the fallback ({_errors[name][:500]})", RuntimeWarning, stacklevel=2)
        return None
    return getattr(torch.ops, f"ddfast_{name}")


def missing(name: str) -> str | None:
    """Why extension ``name`` cannot be used here (loading or building it first), or ``None``."""
    if load(name) is None:
        return f"its compiled extension {name!r} is unavailable: {load_error(name)}"
    return None


def load_error(name: str) -> str | None:
    """Why ``load(name)`` returned ``None`` (``None`` if it has not failed)."""
    return _errors.get(name)

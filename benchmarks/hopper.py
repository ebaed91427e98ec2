"""Compile Triton kernels ahead of time for Hopper (sm_90) without a GPU, and read what the compiler reports.

It proves on a CPU-only machine that a kernel lowers to PTX and a cubin for the H100 / H200, and tells
what the interpreter cannot: registers per thread and spills (``ptxas -v`` on the kernel's PTX), shared
memory per block, and how its dots lower (``wgmma.mma_async``, Hopper's warpgroup tensor-core
instruction, or ``mma.sync``, the per-warp one of earlier GPUs). Compilation runs in one fresh process
because a test session defines kernels in interpreter mode (TRITON_INTERPRET=1); identical specs are
compiled once, and Triton's on-disk cache keeps each compiled config for the next run.

A spec: {"module", "kernel", "pointers": {arg: "*bf16", ...}, "floats": [float32 scalar args],
"constexprs": {arg: value, dtypes as "tl.float32"}, "num_warps", "num_stages", optionally "aligned":
[args]}; every other argument is an int32. "aligned" names the arguments a launch finds divisible by
16 (16-byte-aligned pointers, ints that are multiples of 16), which Triton specialises on: it decides
whether loads vectorise and pipeline, hence the shared memory. Other keys (labels) are carried along
and ignored.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED_MEMORY_PER_BLOCK = 232448  # bytes a block may use on sm_90 (227 KB)
CAPABILITY = 90

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)'")
_PROPERTIES = re.compile(r"Function properties for (?P<name>\S+)")
_FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (?P<regs>\d+) registers")


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per entry function of a ``ptxas -v`` log: {"regs", "spill_stores", "spill_loads", "stack"} (bytes)."""
    usage: dict[str, dict] = {}
    entry = described = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = m["name"]
            usage[entry] = {}
        elif m := _PROPERTIES.search(line):
            described = m["name"]
        elif (m := _FRAME.search(line)) and described in usage:
            usage[described].update(stack=int(m["stack"]), spill_stores=int(m["stores"]), spill_loads=int(m["loads"]))
        elif (m := _REGISTERS.search(line)) and entry is not None:
            usage[entry]["regs"] = int(m["regs"])
    return usage


def resources(specs: list[dict], timeout: float = 900) -> list[dict]:
    """Each spec's kernel on sm_90: {"regs", "spill_stores", "spill_loads", "stack", "shared" (bytes),
    "dots" (whether the kernel has any), "wgmma", "mma_sync" (instruction counts in its PTX)}; raises
    AssertionError with the compiler's error when one fails."""
    keys = [json.dumps(spec, sort_keys=True) for spec in specs]
    unique = list(dict.fromkeys(keys))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__], input=json.dumps([json.loads(k) for k in unique]), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"compiling for sm_90 failed:\n{done.stderr[-4000:]}")
    found = dict(zip(unique, json.loads(done.stdout.strip().splitlines()[-1])))
    return [found[k] for k in keys]


def spilled(specs: list[dict], found: list[dict]) -> dict[str, tuple[int, int]]:
    """``{"kernel (variant)": (spill store bytes, spill load bytes)}`` for the specs whose kernels spill."""
    return {label(spec): (r["spill_stores"], r["spill_loads"]) for spec, r in zip(specs, found) if r["spill_stores"] or r["spill_loads"]}


def label(spec: dict) -> str:
    """The spec's kernel name, with its variant in parentheses where it has one."""
    return f"{spec['kernel']} ({spec['variant']})" if spec.get("variant") else spec["kernel"]


def _ptxas_log(ptx: str) -> str:
    """What ``ptxas -v`` (Triton's own ptxas, for Triton's sm_90 architecture name) says of ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([get_ptxas(CAPABILITY).path, "-v", f"--gpu-name={sm_arch_from_capability(CAPABILITY)}", str(source),
                               "-o", str(source.with_suffix(".cubin"))], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def _compile(spec: dict) -> dict:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    constexprs = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                  for k, v in spec["constexprs"].items()}
    signature = {name: "constexpr" if name in constexprs else
                 spec["pointers"].get(name, "fp32" if name in spec["floats"] else "i32") for name in kernel.arg_names}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.get("aligned", [])}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", CAPABILITY, 32),
                              options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    assert "cubin" in compiled.asm
    ptx = compiled.asm["ptx"]
    usage = parse_ptxas(_ptxas_log(ptx))[compiled.metadata.name]
    return {**usage, "shared": compiled.metadata.shared, "dots": "tt.dot" in compiled.asm["ttir"],
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync")}


if __name__ == "__main__":
    print(json.dumps([_compile(spec) for spec in json.load(sys.stdin)]))

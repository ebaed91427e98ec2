"""Compile Triton kernels ahead of time for Hopper (sm_90), which needs no GPU.

It proves on a CPU-only machine that a kernel lowers to PTX and a cubin for the H100 / H200 and that
its shared memory fits a block, which the interpreter cannot tell. Compilation runs in a fresh
process because the test session defines kernels in interpreter mode (TRITON_INTERPRET=1).

A spec: {"module", "kernel", "pointers": {arg: "*bf16", ...}, "floats": [float32 scalar args],
"constexprs": {arg: value, dtypes as "tl.float32"}, "num_warps", "num_stages", optionally "aligned":
[args]}; every other argument is an int32. "aligned" names the arguments a launch finds divisible by
16 (16-byte-aligned pointers, ints that are multiples of 16), which Triton specialises on: it decides
whether loads vectorise and pipeline, hence the shared memory.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

SHARED_MEMORY_PER_BLOCK = 232448  # bytes a block may use on sm_90 (227 KB)


def shared_memory(specs: list[dict]) -> list[int]:
    """Bytes of shared memory each spec's kernel needs on sm_90; raises with the compiler's error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__], input=json.dumps(specs), env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise AssertionError(f"compiling for sm_90 failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compile(spec: dict) -> int:
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
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    assert "cubin" in compiled.asm
    return compiled.metadata.shared


if __name__ == "__main__":
    print(json.dumps([_compile(spec) for spec in json.load(sys.stdin)]))

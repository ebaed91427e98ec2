"""Static sm_90 report: every Triton kernel compiled for Hopper (H100 / H200) at the launch
configurations its backend picks, with registers per thread, spills, shared memory and how its dots
lower, all without a GPU (see ``benchmarks.hopper``).

The configurations come from the backends' own functions and constants (infonce ``_config``, cmi
``_config`` / ``ROWS`` / ``CHUNK_ROWS``, trajectory_mse ``CHUNK`` / ``BLOCK`` / ``_tensors_block``), so
the report follows the code. ``python benchmarks/static_sm90.py [--ops infonce]`` prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as ``python benchmarks/static_sm90.py``: import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402 (before the imports below)

import torch

from benchmarks import hopper

OPS = ("infonce", "cmi", "trajectory_mse")
INFONCE_D = (64, 128, 256, 512, 1024)
CMI_K = (10, 100, 512, 1000)
TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def infonce_specs(d: int, dtype: torch.dtype, tf32: bool = False) -> list[dict]:
    """The forward kernel and both gradient kernels (dq, dk) at ``_config(kernel, d, dtype)``, rows padded
    to a multiple of 16 features as the backend passes them; float32 dots in full precision, or tf32
    (what ``torch.backends.cuda.matmul.allow_tf32`` selects)."""
    from ddfast.ops.infonce.triton import _config

    element = f"*{TRITON_DTYPES[dtype]}"
    precision = ("tf32" if tf32 else "ieee") if dtype == torch.float32 else None
    kernels = [("_lse_kernel", {"Q": element, "K": element, "RK": "*fp32", "MAX_OUT": "*fp32", "SUM_OUT": "*fp32"},
                ["d", "stride_q", "stride_k", "keys_per_split"], [("", {})]),
               ("_grad_kernel", {"A": element, "B": element, **dict.fromkeys(["RK", "LSE2", "WEIGHT", "OUT"], "*fp32")},
                ["d", "stride_a", "stride_b", "b_per_split"], [("dq", {"QUERY_ROWS": True}), ("dk", {"QUERY_ROWS": False})])]
    specs = []
    for kernel, pointers, multiples_of_16, variants in kernels:
        config = _config(kernel.split("_")[1], -(-d // 16) * 16, dtype)
        launch = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
        for variant, constexprs in variants:
            specs.append({"module": "ddfast.ops.infonce.triton", "kernel": kernel, "variant": variant, "pointers": pointers,
                          "floats": ["scale_log2e", "scale"], "aligned": [*pointers, *multiples_of_16], **launch,
                          "constexprs": {"HAS_NORM": True, "ACC": "tl.float32", "UPCAST": False, "PRECISION": precision,
                                         **config, **constexprs}})
    return specs


def cmi_specs(k: int, dtype: torch.dtype) -> list[dict]:
    """The seven kernels (both combine modes, the row gradient with and without given centroids) for K = ``k``."""
    from ddfast._backends import accumulation_dtype
    from ddfast.ops.cmi import triton as kernels

    element, acc = f"*{TRITON_DTYPES[dtype]}", f"*{TRITON_DTYPES[accumulation_dtype(dtype)]}"
    index = {name: "*i64" for name in ("order_ptr", "start_ptr", "end_ptr", "cls_ptr", "labels_ptr", "first_ptr", "counts_ptr")}
    stats = {name: acc for name in ("norm_ptr", "part_ptr", "inv_t_ptr", "log_q_ptr", "kl_ptr", "g_ptr", "a_ptr")}
    pointers = {"f_ptr": element, **index, **stats}
    config = kernels._config(k, dtype)
    launch = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
    rows = {"ROWS": kernels.ROWS, **config}
    chunk = {"CHUNK": kernels.CHUNK_ROWS, **config}
    common = {"module": "ddfast.ops.cmi.triton", "floats": [], "variant": "", **launch}

    def spec(kernel: str, constexprs: dict, variant: str = "", out: str | None = None) -> dict:
        """Freshly allocated tensors are 16-byte aligned, and ``k`` is specialised when a multiple of 16."""
        arguments = getattr(kernels, kernel).arg_names
        used = {name: t for name, t in {**pointers, "out_ptr": out}.items() if name in arguments and t}
        aligned = [*used, *(["k"] if k % 16 == 0 else [])]
        return {**common, "kernel": kernel, "variant": variant, "pointers": used, "aligned": aligned, "constexprs": constexprs}

    specs = [spec("_row_norm_kernel", rows), spec("_chunk_norm_kernel", chunk), spec("_row_kl_kernel", rows),
             spec("_chunk_centroid_grad_kernel", chunk)]
    specs += [spec("_combine_kernel", {"LOG": log, "CHUNKS": kernels.COMBINE_CHUNKS, "BLOCK_K": config["BLOCK_K"]}, "lse" if log else "mean", acc)
              for log in (True, False)]
    specs += [spec("_row_grad_kernel", {**rows, "HAS_A": has_a}, "given a" if has_a else "", element) for has_a in (True, False)]
    return specs


def trajectory_mse_specs(tensors: int, dtype: torch.dtype) -> list[dict]:
    """The partial sums, their per-trajectory finish and the gradients, for ``tensors`` parameter tensors."""
    from ddfast._backends import accumulation_dtype
    from ddfast.ops.trajectory_mse import triton as kernels

    acc_name = TRITON_DTYPES[accumulation_dtype(dtype)]
    types = {"DTYPE": f"tl.{str(dtype).removeprefix('torch.')}", "ACC": f"tl.float{acc_name[2:]}",
             "TENSORS": kernels._tensors_block(range(tensors)), "CHUNK": kernels.CHUNK, "BLOCK": kernels.BLOCK}
    common = {"module": "ddfast.ops.trajectory_mse.triton", "floats": [], "variant": "", **kernels.LAUNCH}
    per_trajectory = {name: f"*{acc_name}" for name in ("grad", "loss", "num", "den", "partial_num", "partial_den")}
    return [
        {**common, "kernel": "_partials_kernel", "pointers": {"table": "*i64", **per_trajectory}, "constexprs": types},
        {**common, "kernel": "_finish_kernel", "pointers": per_trajectory, "constexprs": {"BLOCK": kernels.FINISH_BLOCK}},
        {**common, "kernel": "_gradients_kernel", "pointers": {"table": "*i64", **per_trajectory},
         "constexprs": {**types, "ROUND_BY_HAND": False}},
    ]


def cases(op: str) -> list[tuple[dict, list[dict]]]:
    """(case: dtype and size, its specs) for every configuration ``op``'s backend launches that the report covers."""
    if op == "infonce":
        dtypes = [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False), (torch.float32, True)]
        return [({"dtype": TRITON_DTYPES[dtype] + (" tf32" if tf32 else ""), "size": f"D={d}"}, infonce_specs(d, dtype, tf32))
                for dtype, tf32 in dtypes for d in INFONCE_D]
    if op == "cmi":
        return [({"dtype": TRITON_DTYPES[dtype], "size": f"K={k}"}, cmi_specs(k, dtype)) for dtype in TRITON_DTYPES for k in CMI_K]
    if op == "trajectory_mse":
        from benchmarks.trajectory_mse import MODELS

        counts = {"flat": 1, **{name: len(shapes) for name, shapes in MODELS.items()}}
        return [({"dtype": TRITON_DTYPES[dtype], "size": f"T={n} ({name})"}, trajectory_mse_specs(n, dtype))
                for dtype in (torch.bfloat16, torch.float32, torch.float64) for name, n in counts.items()]
    raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")


def launch(spec: dict) -> str:
    """The spec's block sizes and launch options, e.g. ``BLOCK_A=64 BLOCK_B=64 BLOCK_D=64, 4 warps, 3 stages``."""
    blocks = " ".join(f"{k}={v}" for k, v in spec["constexprs"].items() if k.isupper() and isinstance(v, int) and not isinstance(v, bool))
    stages = spec["num_stages"]
    return f"{blocks}, {spec['num_warps']} warps, {stages} stage{'s' if stages > 1 else ''}"


def report(op_names=OPS, timeout: float = 1800) -> list[dict]:
    """One row per (op, case, kernel): the case, the launch and ``hopper.resources``' figures."""
    rows = [{"op": op, **case, "kernel": spec["kernel"], "variant": spec["variant"], "launch": launch(spec), "spec": spec}
            for op in op_names for case, specs in cases(op) for spec in specs]
    for row, found in zip(rows, hopper.resources([row.pop("spec") for row in rows], timeout)):
        row.update(found)
    return rows


def dots(row: dict) -> str:
    """How the kernel's dots lower: wgmma, mma.sync, fma (no tensor cores) or - (no dots)."""
    if not row["dots"]:
        return "-"
    return "wgmma" if row["wgmma"] else "mma.sync" if row["mma_sync"] else "fma"


def _cases(rows: list[dict]) -> str:
    """``bf16, fp16 D=64, 128`` when the rows are every pairing of their dtypes and sizes, else a list."""
    dtypes, sizes = list(dict.fromkeys(r["dtype"] for r in rows)), list(dict.fromkeys(r["size"] for r in rows))
    if len(rows) == len(dtypes) * len(sizes):
        prefix = sizes[0].split("=")[0] + "=" if all("=" in s for s in sizes) else ""
        return f"{', '.join(dtypes)} {prefix}{', '.join(s.removeprefix(prefix) for s in sizes)}"
    return "; ".join(f"{r['dtype']} {r['size']}" for r in rows)


def table(rows: list[dict]) -> str:
    """Markdown table, the cases whose launch and figures are equal merged into one line."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["op"], r["kernel"], r["variant"], r["launch"], r["regs"], r["spill_stores"], r["spill_loads"], r["shared"], dots(r))
        groups.setdefault(key, []).append(r)
    first = {}
    for key in groups:
        first.setdefault(key[:3], len(first))
    lines = ["| op | kernel | cases | launch | regs | spills (st/ld B) | smem B | dots |", "|---|---|---|---|---|---|---|---|"]
    for (op, kernel, variant, config, regs, stores, loads, shared, lowering), group in sorted(groups.items(), key=lambda g: first[g[0][:3]]):
        name = f"{kernel} ({variant})" if variant else kernel
        lines.append(f"| {op} | {name} | {_cases(group)} | {config} | {regs} | {stores}/{loads} | {shared} | {lowering} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated operations (default: {','.join(OPS)})")
    args = p.parse_args(argv)
    print(table(report(args.ops.split(","))), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

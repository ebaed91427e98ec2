"""benchmarks.static_sm90: the report's cases follow the backends' configurations, and its table."""

import torch

from benchmarks import static_sm90
from ddfast.ops.cmi import triton as cmi_triton
from ddfast.ops.infonce.triton import _config


def test_infonce_specs_use_the_backend_config():
    for d, dtype in [(64, torch.bfloat16), (100, torch.float16), (1024, torch.float32)]:
        for spec in static_sm90.infonce_specs(d, dtype):
            config = _config(spec["kernel"].split("_")[1], -(-d // 16) * 16, dtype)
            assert (spec["num_warps"], spec["num_stages"]) == (config.pop("num_warps"), config.pop("num_stages"))
            assert {k: spec["constexprs"][k] for k in config} == config


def test_cmi_specs_use_the_backend_config_and_alignment():
    """Each kernel at ``_config``'s launch; ``k`` counts as 16-divisible exactly when a launch specialises on it."""
    for k, dtype in [(10, torch.bfloat16), (100, torch.float32), (512, torch.float16), (1000, torch.float64)]:
        config = cmi_triton._config(k, dtype)
        for spec in static_sm90.cmi_specs(k, dtype):
            assert (spec["num_warps"], spec["num_stages"], spec["constexprs"]["BLOCK_K"]) == (
                config["num_warps"], config["num_stages"], config["BLOCK_K"]), spec["kernel"]
            assert spec["constexprs"].get("ROWS", cmi_triton.ROWS) == cmi_triton.ROWS
            assert spec["constexprs"].get("CHUNK", cmi_triton.CHUNK_ROWS) == cmi_triton.CHUNK_ROWS
            assert ("k" in spec["aligned"]) == (k % 16 == 0) and set(spec["pointers"]) <= set(spec["aligned"])


def row(dtype, size, regs, kernel="_lse_kernel", stores=0):
    return {"op": "infonce", "dtype": dtype, "size": size, "kernel": kernel, "variant": "", "launch": "BLOCK_A=64, 4 warps, 3 stages",
            "regs": regs, "spill_stores": stores, "spill_loads": stores, "shared": 1024, "dots": True, "wgmma": 4, "mma_sync": 0}


def test_table_merges_equal_cases_and_keeps_kernels_together():
    rows = [row("bf16", "D=64", 72), row("bf16", "D=64", 90, kernel="_grad_kernel"), row("fp16", "D=64", 72),
            row("bf16", "D=128", 72), row("fp16", "D=128", 72), row("fp32", "D=64", 255, stores=28)]
    lines = static_sm90.table(rows).splitlines()
    assert lines[2] == "| infonce | _lse_kernel | bf16, fp16 D=64, 128 | BLOCK_A=64, 4 warps, 3 stages | 72 | 0/0 | 1024 | wgmma |"
    assert lines[3] == "| infonce | _lse_kernel | fp32 D=64 | BLOCK_A=64, 4 warps, 3 stages | 255 | 28/28 | 1024 | wgmma |"
    assert lines[4].startswith("| infonce | _grad_kernel | bf16 D=64 |") and len(lines) == 5


def test_dots_tell_the_lowering():
    assert [static_sm90.dots({**row("bf16", "D=64", 1), **change}) for change in
            ({}, {"wgmma": 0, "mma_sync": 8}, {"wgmma": 0}, {"dots": False})] == ["wgmma", "mma.sync", "fma", "-"]

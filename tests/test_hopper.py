"""benchmarks.hopper: reading registers and spills from ``ptxas -v``."""

from benchmarks import hopper

# ptxas 13 (Triton 3.8's) on the InfoNCE kernels for sm_90a: float32 dq at D=128, which spills, and
# the bfloat16 forward at D=1024, which does not
SPILLING = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_grad_kernel' for 'sm_90a'
ptxas info    : Function properties for _grad_kernel
    6384 bytes stack frame, 14484 bytes spill stores, 19988 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 6384 bytes cumulative stack size
ptxas info    : Compile time = 4604.368 ms
"""
CLEAN = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_lse_kernel' for 'sm_90a'
ptxas info    : Function properties for _lse_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 176 registers, used 1 barriers
ptxas info    : Compile time = 174.860 ms
"""


def test_parse_ptxas_reads_registers_and_spills():
    assert hopper.parse_ptxas(SPILLING) == {"_grad_kernel": {"regs": 32, "stack": 6384, "spill_stores": 14484, "spill_loads": 19988}}
    assert hopper.parse_ptxas(CLEAN) == {"_lse_kernel": {"regs": 176, "stack": 0, "spill_stores": 0, "spill_loads": 0}}


def test_parse_ptxas_keeps_entries_apart():
    both = hopper.parse_ptxas(CLEAN + SPILLING)
    assert both["_lse_kernel"]["regs"] == 176 and both["_grad_kernel"]["regs"] == 32
    assert both["_lse_kernel"]["spill_stores"] == 0 and both["_grad_kernel"]["spill_loads"] == 19988


def test_spilled_names_kernels_and_variants():
    specs = [{"kernel": "_lse_kernel"}, {"kernel": "_grad_kernel", "variant": "dq"}]
    found = [{"spill_stores": 0, "spill_loads": 0}, {"spill_stores": 8, "spill_loads": 4}]
    assert hopper.spilled(specs, found) == {"_grad_kernel (dq)": (8, 4)}

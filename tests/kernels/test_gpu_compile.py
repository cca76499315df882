"""The kernels compile for a Hopper GPU (sm_90) even though the tests run them in the interpreter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from cartridges_kernels.config import SWEEP_CONFIGS

HERE = Path(__file__).resolve().parent


def test_kernels_compile_for_sm90() -> None:
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    assert (tools / "ptxas").exists() or shutil.which("ptxas"), (
        "the pinned triton wheel ships ptxas; this install lacks it"
    )
    assert (tools / "cuobjdump").exists(), "the pinned triton wheel ships cuobjdump; this install lacks it"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1] / "kernels"), env.get("PYTHONPATH", "")])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, str(HERE / "_compile_sm90.py")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(": ok") == 5
    assert "segment kernel fp32: 0 tf32 mma instructions" in proc.stdout  # fp32 dots stay exact
    lines = proc.stdout.splitlines()
    aligned = next(line for line in lines if "'ALIGNED': True" in line)
    assert _wide_loads(aligned) > 0, f"aligned segments must compile to 16-byte loads: {aligned}"
    fused = next(line for line in lines if "'SEG_ALIGNED': True" in line and "'OWN_ALIGNED': True" in line)
    # The fused kernel's cartridge loop and own-KV loop must each get the segment kernel's wide loads.
    assert _wide_loads(fused) >= 2 * _wide_loads(aligned), f"fused aligned variant lost 16-byte loads: {fused}"
    # The default tiles and every config the GPU benchmark sweeps keep their key-block loops in registers: a
    # spill there is a slowdown that would otherwise only show up as a worse number after a GPU run. (ptxas
    # may park a few predicates on the stack outside the loops, once per program: that is not checked.)
    usage = [line for line in lines if line.startswith("registers ")]
    # + the default bf16 at head_dim 128, 64 and 256, without own KV, the default quantized with and without
    # TMA, the segment kernel, the warp-specialized kernel at each swept config that asks for it, and the
    # cartridge and own launches of each side-by-side config
    specialized = [line for line in usage if line.startswith("registers ws ")]
    assert len(specialized) == sum(c.warp_specialize for c in SWEEP_CONFIGS) > 0, proc.stdout
    side_by_side = [c for c in SWEEP_CONFIGS if c.side_by_side]
    assert len(usage) == len(SWEEP_CONFIGS) + 7 + len(specialized) + 2 * len(side_by_side), proc.stdout
    # Triton turns warp specialization off without a word when a loop does not suit it; setmaxnreg (producer
    # warps giving registers to consumer warpgroups) shows it is on.
    assert all(int(line.split("(")[1].split()[0]) > 0 for line in specialized), specialized
    spilling = [line for line in usage if not line.endswith(" 0 local-memory ops in loops")]
    assert not spilling, "configs that spill registers in their loops on sm_90:\n" + "\n".join(spilling)
    # A step without own KV holds as many shared programs per SM as one with it.
    default, cartridges_only = usage[0], next(line for line in usage if "cartridges only" in line)
    assert _programs_per_sm(cartridges_only) == _programs_per_sm(default), (default, cartridges_only)
    # Side by side, the own walk can overlap the cartridge walk within an SM, not only across SMs.
    beside = [line for line in lines if line.endswith("own programs per SM beside a cartridge program")]
    assert len(beside) == len(side_by_side) > 0, proc.stdout
    assert all(int(line.rsplit(": ", 1)[1].split()[0]) >= 1 for line in beside), beside


def _programs_per_sm(line: str) -> int:
    return int(line.split(" programs per SM")[0].rsplit(" ", 1)[-1])


def _wide_loads(line: str) -> int:
    return int(line.split(", ")[-1].split()[0])

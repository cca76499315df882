"""Compile the kernels for sm_90 with Triton's real pipeline (frontend, LLVM, ptxas); no GPU needed.

Run by test_gpu_compile.py in a subprocess without TRITON_INTERPRET: the interpreter executes kernels as
Python and misses errors only the compiler reports (types of loop-carried values, pointer casts, layouts).
"""

from __future__ import annotations

import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cartridges_kernels.fused_kernel import _fused_decode_kernel
from cartridges_kernels.merge_kernel import _merge_kernel
from cartridges_kernels.segment_kernel import _segment_partials_kernel

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(kernel: triton.JITFunction, types: dict[str, str], constants: dict[str, object]) -> tuple[int, int]:
    """Compile with the given runtime argument types and constexprs; returns (shared memory bytes, number of
    16-byte global loads in the PTX: asynchronous copies or vector loads)."""
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    compiled = triton.compile(
        ASTSource(kernel, signature, constants), target=TARGET, options={"num_warps": 4, "num_stages": 2}
    )
    ptx = compiled.asm["ptx"]
    wide = len(re.findall(r"cp\.async\.cg\.shared\.global|ld\.global(?:\.\w+)*\.v4\.b32", ptx))
    return int(compiled.metadata.shared), wide


def _side(prefix: str, k: object, v: object, k_scale: int, v_scale: int, is_aligned: bool) -> dict[str, object]:
    """The fused kernel's storage-format constexprs for its cartridges ("SEG") or own KV ("OWN")."""
    return {
        f"{prefix}_K_DTYPE": k,
        f"{prefix}_V_DTYPE": v,
        f"{prefix}_K_SCALE": k_scale,
        f"{prefix}_V_SCALE": v_scale,
        f"{prefix}_ALIGNED": is_aligned,
    }


def main() -> None:
    pointers = ["meta_ptr", "tiles_ptr", "row_token_ptr", "row_slot_ptr", "row_qpos_ptr"]
    seg_types = {
        **{name: "*i64" if name == "meta_ptr" else "*i32" for name in pointers},
        **{name: "i32" for name in ["stride_qt", "stride_qh", "n_tokens", "q_heads"]},
        "part_o_ptr": "*fp32",
        "part_lse_ptr": "*fp32",
        "qk_scale": "fp32",
    }
    shape = {"GROUP": 4, "GROUP_PAD": 4, "BLOCK_M": 16, "BLOCK_N": 64, "HEAD_DIM": 128, "BLOCK_D": 128}
    variants = [
        (
            "bf16",
            {
                "K_DTYPE": tl.bfloat16,
                "V_DTYPE": tl.bfloat16,
                "K_SCALE": 0,
                "V_SCALE": 0,
                "CAUSAL": True,
                "ALIGNED": True,
            },
        ),
        (
            "fp16",
            {
                "K_DTYPE": tl.int8,
                "V_DTYPE": tl.float8e4nv,
                "K_SCALE": 2,
                "V_SCALE": 1,
                "CAUSAL": False,
                "ALIGNED": False,
            },
        ),
    ]
    for q_type, formats in variants:
        smem, wide = compile_kernel(
            _segment_partials_kernel, {**seg_types, "q_ptr": f"*{q_type}"}, {**shape, **formats}
        )
        print(f"segment kernel q={q_type} {formats}: ok, {smem} bytes shared memory, {wide} wide loads")
    fused_types = {
        **{name: "*i64" for name in ["seg_meta_ptr", "own_meta_ptr"]},
        **{name: "*i32" for name in ["tiles_ptr", "tile_segments_ptr", "row_request_ptr"]},
        **{name: "i32" for name in ["stride_qt", "stride_qh", "n_tokens", "q_heads"]},
        "lse_ptr": "*fp32",
        "qk_scale": "fp32",
    }
    fused_variants = [
        (  # bf16 cartridges and own KV, written straight to the bf16 output
            "bf16",
            "bf16",
            {
                **_side("SEG", tl.bfloat16, tl.bfloat16, 0, 0, True),
                **_side("OWN", tl.bfloat16, tl.bfloat16, 0, 0, True),
            },
        ),
        (  # int8/fp8 cartridges, unaligned own KV, fp32 partials for the merge
            "fp16",
            "fp32",
            {**_side("SEG", tl.int8, tl.float8e4nv, 2, 1, True), **_side("OWN", tl.float16, tl.float16, 0, 0, False)},
        ),
    ]
    for q_type, out_type, formats in fused_variants:
        types = {**fused_types, "q_ptr": f"*{q_type}", "out_ptr": f"*{out_type}"}
        smem, wide = compile_kernel(_fused_decode_kernel, types, {**shape, **formats, "HAS_OWN": True})
        print(f"fused kernel q={q_type} {formats}: ok, {smem} bytes shared memory, {wide} wide loads")
    merge_types = {
        "part_o_ptr": "*fp32",
        "part_lse_ptr": "*fp32",
        "out_ptr": "*bf16",
        "out_lse_ptr": "*fp32",
        "num_slots": "i32",
        "num_rows": "i32",
    }
    compile_kernel(_merge_kernel, merge_types, {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_P": 16})
    print("merge kernel: ok")


if __name__ == "__main__":
    main()

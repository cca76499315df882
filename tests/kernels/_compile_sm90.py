"""Compile the kernels for sm_90 with Triton's real pipeline (frontend, LLVM, ptxas); no GPU needed.

Run by test_gpu_compile.py in a subprocess without TRITON_INTERPRET: the interpreter executes kernels as
Python and misses errors only the compiler reports (types of loop-carried values, pointer casts, layouts).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cartridges_kernels.config import (
    MIN_DOT,
    SWEEP_CONFIGS,
    KernelConfig,
    default_config,
    dot_precision,
    own_block_n,
)
from cartridges_kernels.fused_kernel import _fused_decode_kernel
from cartridges_kernels.merge_kernel import _merge_kernel
from cartridges_kernels.segment_kernel import _segment_partials_kernel
from cartridges_kernels.ws_kernel import _cartridge_ws_kernel

TARGET = GPUTarget("cuda", 90, 32)
TF32_MMA = re.compile(r"mma\S*\.tf32")  # mma.sync (sm_80) or wgmma (sm_90) reading TF32 operands
SCALARS = ["stride_qt", "stride_qh", "n_tokens", "q_heads"]  # integer arguments every attention kernel takes


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
NVDISASM = CUOBJDUMP.with_name("nvdisasm")


def compile_kernel(
    kernel: triton.JITFunction, types: dict[str, str], constants: dict[str, object], warps: int = 4, stages: int = 2
) -> triton.compiler.CompiledKernel:
    """Compile with the given runtime argument types and constexprs; the attention kernels' DOT_PRECISION is
    the one their launchers give queries of the compiled type."""
    if "DOT_PRECISION" in kernel.arg_names:
        queries = types.get("q_ptr", types.get("q_tiles_ptr"))
        constants = {
            "DOT_PRECISION": dot_precision(torch.float32 if queries == "*fp32" else torch.bfloat16),
            **constants,
        }
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    options = {"num_warps": warps, "num_stages": stages}
    return triton.compile(ASTSource(kernel, signature, constants), target=TARGET, options=options)


def wide_loads(compiled: triton.compiler.CompiledKernel) -> int:
    """16-byte global loads in the PTX: asynchronous copies or vector loads."""
    return len(re.findall(r"cp\.async\.cg\.shared\.global|ld\.global(?:\.\w+)*\.v4\.b32", compiled.asm["ptx"]))


def registers_and_stack(compiled: triton.compiler.CompiledKernel) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of the cubin; stack > 0 means registers spilled."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout)
    assert found, usage.stdout
    return int(found[1]), int(found[2])


def _side(prefix: str, k: object, v: object, k_scale: int, v_scale: int, is_aligned: bool) -> dict[str, object]:
    """The fused kernel's storage-format constexprs for its cartridges ("SEG") or own KV ("OWN")."""
    return {
        f"{prefix}_K_DTYPE": k,
        f"{prefix}_V_DTYPE": v,
        f"{prefix}_K_SCALE": k_scale,
        f"{prefix}_V_SCALE": v_scale,
        f"{prefix}_ALIGNED": is_aligned,
    }


def compile_tiles(
    kernel: triton.JITFunction,
    types: dict[str, str],
    formats: dict[str, object],
    config: KernelConfig,
    head_dim: int = 128,
    own_keys: int | None = None,
) -> triton.compiler.CompiledKernel:
    """The kernel at GQA 4 with the config's tiles, warps and stages; the fused kernel's own blocks are
    ``own_keys`` keys, or what the dispatcher picks for 16-bit own KV."""
    tiles = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "HEAD_DIM": head_dim, "BLOCK_D": head_dim,
             "TMA": config.tma}  # fmt: skip
    constants = {"GROUP": 4, "GROUP_PAD": 4, **tiles, **formats}
    if kernel is _fused_decode_kernel:
        dequantizes = any(formats[f"{side}_{kv}_SCALE"] for side in ("SEG", "OWN") for kv in "KV")
        own_keys = own_keys or own_block_n(config, head_dim, 2, dequantizes)
        constants.update(OWN_BLOCK_M=16, OWN_BLOCK_N=own_keys)
    if "TMA" not in kernel.arg_names:  # ws_kernel: always through descriptors
        del constants["TMA"]
    return compile_kernel(kernel, types, constants, config.num_warps, config.num_stages)


def innermost_loops(compiled: triton.compiler.CompiledKernel) -> list[list[str]]:
    """The SASS opcodes of each innermost loop (a backward branch's body holding no other backward branch),
    in address order: what a program executes once per key block."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([NVDISASM, "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    labels: dict[str, int] = {}
    code: list[tuple[int, str]] = []  # (address, instruction without its predicate)
    pending: list[str] = []
    for line in sass.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            pending.append(label[1])
        elif found := re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([^;]+);", line):
            address = int(found[1], 16)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            code.append((address, found[2].strip()))
    loops = []
    for address, instruction in code:
        target = re.match(r"BRA\s+`\((\.L_x_\d+)\)", instruction)
        if target and labels[target[1]] < address:
            loops.append((labels[target[1]], address))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [[op.split()[0] for at, op in code if a <= at <= b] for a, b in innermost]


def loop_summary(compiled: triton.compiler.CompiledKernel) -> str:
    """Instructions per pass of each key-block loop (innermost loops but the few-instruction spins that wait
    on a TMA barrier), and local-memory (spill) instructions inside any innermost loop."""
    loops = innermost_loops(compiled)
    local = sum(op.startswith(("LDL", "STL")) for loop in loops for op in loop)
    blocks = "/".join(str(len(loop)) for loop in loops if len(loop) > 8)
    return f"loops of {blocks} instructions, {local} local-memory ops in loops"


def resident_programs(registers: int, shared_bytes: int, warps: int) -> int:
    """Programs an H100/H200 SM holds at once (65536 registers allocated per warp in 256s, 228 KB of shared
    memory with 1 KB reserved per block): the occupancy a memory-bound walk gets."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(65536 // (per_warp * warps), 228 * 1024 // (shared_bytes + 1024), 64 // warps)


def print_registers(name: str, config: KernelConfig, compiled: triton.compiler.CompiledKernel) -> None:
    registers, stack = registers_and_stack(compiled)
    shared, warps = compiled.metadata.shared, compiled.metadata.num_warps  # warp specialization adds warps
    print(f"registers {name} {config}: {registers} registers, {shared} bytes shared memory, {warps} warps, "
          f"{resident_programs(registers, shared, warps)} programs per SM, {stack} bytes stack, "
          f"{loop_summary(compiled)}")  # fmt: skip


SEGMENT_POINTERS = ["meta_ptr", "tiles_ptr", "row_token_ptr", "row_slot_ptr", "row_back_ptr"]
SEGMENT_TYPES = {
    **{name: "*i64" if name == "meta_ptr" else "*i32" for name in SEGMENT_POINTERS},
    **{name: "i32" for name in SCALARS},
    "part_o_ptr": "*fp32",
    "part_lse_ptr": "*fp32",
    "qk_scale": "fp32",
}


def print_side_by_side(config: KernelConfig) -> None:
    """The multi-launch path's two bf16 decode launches at batch 64 with a shared cartridge (the cartridge's
    64-row tiles, own KV's 16-row causal ones), and how many own programs an SM holds beside one cartridge
    program: with ``side_by_side`` the two walks overlap within an SM only if that is at least one."""
    types = {**SEGMENT_TYPES, "q_ptr": "*bf16", "part_o_ptr": "*bf16"}
    formats = {"K_DTYPE": tl.bfloat16, "V_DTYPE": tl.bfloat16, "K_SCALE": 0, "V_SCALE": 0, "ALIGNED": True}
    usage = []  # (registers, shared bytes, warps) of one cartridge program, then one own program
    for block_m, causal in ((config.block_m, False), (MIN_DOT, True)):
        tiles = replace(config, block_m=block_m)
        compiled = compile_tiles(_segment_partials_kernel, types, {**formats, "CAUSAL": causal}, tiles)
        print_registers(f"side by side {'own' if causal else 'cartridge'}", tiles, compiled)
        registers, _ = registers_and_stack(compiled)
        warps = compiled.metadata.num_warps
        usage.append((-(-registers * 32 // 256) * 256 * warps, compiled.metadata.shared + 1024, warps))
    (cartridge_registers, cartridge_shared, cartridge_warps), (own_registers, own_shared, own_warps) = usage
    beside = min(
        (65536 - cartridge_registers) // own_registers,
        (228 * 1024 - cartridge_shared) // own_shared,
        (64 - cartridge_warps) // own_warps,
    )
    print(f"side by side {config}: {beside} own programs per SM beside a cartridge program")


def main() -> None:
    shape = {"GROUP": 4, "GROUP_PAD": 4, "BLOCK_M": 16, "BLOCK_N": 64, "HEAD_DIM": 128, "BLOCK_D": 128, "TMA": False}
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
    for q_type, formats in variants:  # partials in q's dtype, as the dispatcher allocates them
        types = {**SEGMENT_TYPES, "q_ptr": f"*{q_type}", "part_o_ptr": f"*{q_type}"}
        compiled = compile_kernel(_segment_partials_kernel, types, {**shape, **formats})
        print(f"segment kernel q={q_type} {formats}: ok, {compiled.metadata.shared} bytes shared memory, "
              f"{wide_loads(compiled)} wide loads")  # fmt: skip
    # fp32 queries and KV (an engine set to float32 on a GPU): exact dots, not TF32 tensor-core ones
    fp32 = {**variants[0][1], "K_DTYPE": tl.float32, "V_DTYPE": tl.float32}
    types = {**SEGMENT_TYPES, "q_ptr": "*fp32", "part_o_ptr": "*fp32"}
    compiled = compile_kernel(_segment_partials_kernel, types, {**shape, **fp32})
    print(f"segment kernel fp32: {len(TF32_MMA.findall(compiled.asm['ptx']))} tf32 mma instructions")
    fused_types = {
        **{name: "*i64" for name in ["seg_meta_ptr", "own_meta_ptr"]},
        **{name: "*i32" for name in ["tiles_ptr", "tile_segments_ptr", "row_request_ptr"]},
        **{name: "i32" for name in [*SCALARS, "shared_programs", "shared_splits", "own_splits"]},
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
        (  # int8/fp8 cartridges, unaligned own KV, fp16 partials for the merge
            "fp16",
            "fp16",
            {**_side("SEG", tl.int8, tl.float8e4nv, 2, 1, True), **_side("OWN", tl.float16, tl.float16, 0, 0, False)},
        ),
    ]
    for q_type, out_type, formats in fused_variants:
        types = {**fused_types, "q_ptr": f"*{q_type}", "out_ptr": f"*{out_type}"}
        compiled = compile_kernel(
            _fused_decode_kernel, types, {**shape, **formats, "OWN_BLOCK_M": 16, "OWN_BLOCK_N": 128}
        )
        print(f"fused kernel q={q_type} {formats}: ok, {compiled.metadata.shared} bytes shared memory, "
              f"{wide_loads(compiled)} wide loads")  # fmt: skip
    bf16_types = {**fused_types, "q_ptr": "*bf16", "out_ptr": "*bf16"}
    for config in (default_config(128), *SWEEP_CONFIGS):
        print_registers("fused", config, compile_tiles(_fused_decode_kernel, bf16_types, fused_variants[0][2], config))
    # A step without own KV: the own branch is compiled for q's dtype, unaligned, never run, with the shared
    # walk's block size (the dispatcher's choice), so it must not cost the shared programs occupancy.
    cartridges_only = {**fused_variants[0][2], **_side("OWN", tl.bfloat16, tl.bfloat16, 0, 0, False)}
    config = default_config(128)
    compiled = compile_tiles(_fused_decode_kernel, bf16_types, cartridges_only, config, own_keys=config.block_n)
    print_registers("fused cartridges only", config, compiled)
    for head_dim in (64, 256):  # the defaults at the other head sizes models use
        config = default_config(head_dim)
        compiled = compile_tiles(_fused_decode_kernel, bf16_types, fused_variants[0][2], config, head_dim)
        print_registers(f"fused head_dim {head_dim}", config, compiled)
    quantized_types = {**fused_types, "q_ptr": "*fp16", "out_ptr": "*fp16"}  # int8/fp8 cartridges, partials
    dequantizing = default_config(128, dequantizes=True)
    quantized = compile_tiles(_fused_decode_kernel, quantized_types, fused_variants[1][2], dequantizing)
    print_registers("fused-quantized", dequantizing, quantized)
    dequantizing = replace(dequantizing, tma=True)  # 1-byte blocks through descriptors
    quantized = compile_tiles(_fused_decode_kernel, quantized_types, fused_variants[1][2], dequantizing)
    print_registers("fused-quantized", dequantizing, quantized)
    ws_types = {**{name: "*i32" for name in ["tiles_ptr", "row_token_ptr", "row_slot_ptr"]}, "meta_ptr": "*i64",
                **{name: "*bf16" for name in ["q_tiles_ptr", "k_base_ptr", "v_base_ptr", "part_o_ptr"]},
                "part_lse_ptr": "*fp32", "n_tokens": "i32", "q_heads": "i32", "qk_scale": "fp32",
                "num_tiles": "i32"}  # fmt: skip
    for config in (c for c in SWEEP_CONFIGS if c.warp_specialize):
        ws = compile_tiles(_cartridge_ws_kernel, ws_types, {}, config)
        print_registers(f"ws ({len(re.findall('setmaxnreg', ws.asm['ptx']))} setmaxnreg)", config, ws)
    segment_formats = {**variants[0][1], "CAUSAL": True}
    segment = compile_tiles(
        _segment_partials_kernel, {**SEGMENT_TYPES, "q_ptr": "*bf16", "part_o_ptr": "*bf16"}, segment_formats,
        default_config(128),
    )  # fmt: skip
    print_registers("segment", default_config(128), segment)
    for config in (c for c in SWEEP_CONFIGS if c.side_by_side):
        print_side_by_side(config)
    merge_types = {
        "part_o_ptr": "*fp32",
        "part_lse_ptr": "*fp32",
        "out_ptr": "*bf16",
        "out_lse_ptr": "*fp32",
        "num_slots": "i32",
        "num_rows": "i32",
    }
    for partials in ("*fp32", "*bf16"):  # the multi-launch path's partials, the fused decode path's
        compile_kernel(
            _merge_kernel, {**merge_types, "part_o_ptr": partials}, {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_P": 16}
        )
    print("merge kernel: ok")


if __name__ == "__main__":
    main()

"""Launch configurations for the segment kernel and the checks the Triton interpreter does not make.

The interpreter happily runs tiles that a GPU compile rejects or that spill registers badly (dots smaller than
16, non-power-of-two blocks, oversized tiles); the launcher calls :func:`check_config` so a bad config fails
the same way on CPU as it would on a GPU, with a message that says what to change.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace

import torch

MIN_DOT = 16  # tl.dot needs every dimension >= 16
MAX_BLOCK_M = 128
MAX_BLOCK_N = 256
MAX_HEAD_DIM = 256
# fp32 accumulator elements per thread before registers spill: 128 (64 rows x head_dim 256 on 4 warps) spills on
# sm_90 with Triton 3.6 and 3.9 (tests/kernels/test_gpu_compile.py compiles the defaults)
MAX_ACC_PER_THREAD = 64
# Shared memory one block may use where there is no device to ask (the interpreter). GPUs give a block what
# shared_memory_limit() reads: 99 KB on sm_86/sm_89/sm_120 (A10, L4, RTX 30xx-50xx), 163 KB on sm_80, 227 KB on sm_90.
SHARED_MEMORY_BYTES = 160 * 1024
FP8_CAPABILITY = (8, 9)  # Triton's float8e4nv (float8_e4m3fn KV) needs sm_89 or newer
# K+V bytes an own program of the fused decode kernel keeps in flight. Triton stages the own walk's loads
# num_stages - 1 deep (its dots are mma.sync, which read registers; the shared walk's wgmma reads shared memory
# and gets num_stages buffers): at 2 stages each own block was one serial round trip. 64 KB reads a 128-token
# bf16 own KV at head_dim 128 in one trip: one 128-key block at 2 stages, two 64-key blocks at 3.
OWN_BLOCK_BYTES = 64 * 1024
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256
# Decode takes the fused kernel while its shared walks cover fewer (request, cartridge key) pairs than this,
# and the multi-launch path from there on. Measured on an H200 (bench/results/kernels-gpu.json, head_dim 128,
# GQA 4): the fused kernel is 1.1-1.6x faster below 2**17 pairs (one 2048-token cartridge at batch <= 32, two
# at batch <= 16) and 5-60% slower from there (one at batch 64: 1.29 vs 1.22 ms; two at 256: 6.86 vs 4.25).
FUSED_DECODE_MAX_SHARED_ROWS = 1 << 17


@dataclass(frozen=True)
class KernelConfig:
    """Segment-kernel tiles: ``block_m`` query rows (tokens x padded GQA group), ``block_n`` keys;
    ``own_block_n`` keys per block of the fused decode kernel's own-KV walk (None: see own_block_n());
    ``tma``: copy the blocks of 16-byte-aligned segments with the Tensor Memory Accelerator (sm_90+; off by
    default until a GPU run shows it faster: the benchmark sweeps it); ``warp_specialize`` (with ``tma``): the
    multi-launch path's cartridge launches run ``ws_kernel`` (sm_90; swept, not yet timed); ``side_by_side``:
    the multi-launch path queues its partial launches on CUDA streams of their own (``streams``), so the own-KV
    walk may overlap the cartridge walk (swept, not yet timed)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    own_block_n: int | None = None
    tma: bool = False
    warp_specialize: bool = False
    side_by_side: bool = False


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for queries of ``dtype`` (a kernel constexpr): exact ("ieee") for float32, whose
    dots Triton would otherwise run as TF32 with 10-bit mantissas; 16-bit dots are exact either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: head_dim rounded up to a power of two a dot accepts."""
    return max(next_pow2(head_dim), MIN_DOT)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_config(
    config: KernelConfig, group_pad: int, head_dim: int, kv_bytes: int, shared_memory: int = SHARED_MEMORY_BYTES
) -> None:
    """Raise ValueError if the config cannot compile, or would spill, on a GPU giving a block ``shared_memory``
    bytes."""
    block_d = padded_head_dim(head_dim)
    if not (_is_pow2(config.block_m) and MIN_DOT <= config.block_m <= MAX_BLOCK_M):
        raise ValueError(f"block_m={config.block_m} must be a power of two in [{MIN_DOT}, {MAX_BLOCK_M}]")
    if not (_is_pow2(config.block_n) and MIN_DOT <= config.block_n <= MAX_BLOCK_N):
        raise ValueError(f"block_n={config.block_n} must be a power of two in [{MIN_DOT}, {MAX_BLOCK_N}]")
    if config.own_block_n is not None and not (
        _is_pow2(config.own_block_n) and MIN_DOT <= config.own_block_n <= MAX_BLOCK_N
    ):
        raise ValueError(f"own_block_n={config.own_block_n} must be a power of two in [{MIN_DOT}, {MAX_BLOCK_N}]")
    if config.warp_specialize and not config.tma:
        raise ValueError("warp_specialize=True reads through tensor descriptors: set tma=True too")
    if config.block_m < group_pad:
        raise ValueError(f"block_m={config.block_m} is smaller than the GQA group ({group_pad} query heads)")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} exceeds {MAX_HEAD_DIM}")
    if config.num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps={config.num_warps} must be 1, 2, 4, 8 or 16")
    acc_per_thread = config.block_m * block_d // (32 * config.num_warps)
    if acc_per_thread > MAX_ACC_PER_THREAD:
        raise ValueError(
            f"block_m={config.block_m} x head_dim {block_d} needs {acc_per_thread} accumulator registers "
            f"per thread with {config.num_warps} warps (max {MAX_ACC_PER_THREAD}); lower block_m or raise "
            "num_warps"
        )
    smem = shared_memory_bytes(config, head_dim, kv_bytes)
    if smem > shared_memory:
        raise ValueError(
            f"block_n={config.block_n}, head_dim {block_d}, {config.num_stages} stages need {smem} bytes of "
            f"shared memory (max {shared_memory}); lower block_n or num_stages"
        )
    own_smem = max(1, config.num_stages - 1) * 2 * (config.own_block_n or 0) * block_d * kv_bytes
    if own_smem > shared_memory:
        raise ValueError(
            f"own_block_n={config.own_block_n}, head_dim {block_d}, {config.num_stages} stages need {own_smem} "
            f"bytes of shared memory (max {shared_memory}); lower own_block_n or num_stages"
        )


@functools.lru_cache(maxsize=256)
def check_launch(
    config: KernelConfig, block_m: int, group_pad: int, head_dim: int, kv_bytes: int, device: torch.device
) -> None:
    """check_config for a launch on ``device`` whose plan sized its tiles to ``block_m`` query rows. Cached (a
    failing check is not): every layer of every step launches with the same few."""
    check_config(replace(config, block_m=block_m), group_pad, head_dim, kv_bytes, shared_memory_limit(device))


@functools.cache
def shared_memory_limit(device: torch.device) -> int:
    """The shared memory one block may opt in to on ``device``; SHARED_MEMORY_BYTES off CUDA (the interpreter)."""
    if device.type != "cuda":
        return SHARED_MEMORY_BYTES
    return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)


def check_fp8_storage(dtypes: AbstractSet[torch.dtype], capability: tuple[int, int] | None) -> None:
    """Refuse float8_e4m3fn keys/values on a GPU of ``capability`` below FP8_CAPABILITY, where Triton cannot
    compile them (None: no GPU, the interpreter reads them)."""
    if capability is not None and capability < FP8_CAPABILITY and torch.float8_e4m3fn in dtypes:
        raise ValueError(
            f"fp8 (float8_e4m3fn) cartridges need a GPU of compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} "
            f"or newer, this one is {capability[0]}.{capability[1]}; store them as int8 (cartridges quantize "
            "--format int8) or unquantized"
        )


def own_block_n(config: KernelConfig, head_dim: int, kv_bytes: int, dequantizes: bool = False) -> int:
    """Keys per own-KV block of the fused decode kernel: config.own_block_n, else the most (up to 128, at
    least config.block_n) whose staged key and value blocks fit OWN_BLOCK_BYTES. A kernel that ``dequantizes``
    (cartridges or own KV) keeps config.block_n: it is at the register limit already (255 on sm_90 at the
    default tiles) and bigger own blocks make it spill (tests/kernels/test_gpu_compile.py)."""
    if config.own_block_n is not None:
        return config.own_block_n
    if dequantizes:
        return config.block_n
    buffers = max(1, config.num_stages - 1)
    block_d = padded_head_dim(head_dim)
    n = 128
    while n > config.block_n and buffers * 2 * n * block_d * kv_bytes > OWN_BLOCK_BYTES:
        n //= 2
    return max(n, config.block_n)


def shared_memory_bytes(config: KernelConfig, head_dim: int, kv_bytes: int) -> int:
    """An upper bound on the shared memory of the config's key/value pipeline and query tile."""
    block_d = padded_head_dim(head_dim)
    return config.num_stages * 2 * config.block_n * block_d * kv_bytes + config.block_m * block_d * 4


def default_config(
    head_dim: int, kv_bytes: int = 2, dequantizes: bool = False, shared_memory: int = SHARED_MEMORY_BYTES
) -> KernelConfig:
    """A fixed config (no autotuning: the interpreter cannot time, and decode shapes vary every step).

    Three pipeline stages: on an H200 they were 3-6% faster than two for decode at batch 64 and 256, with as
    many programs per SM (bench/results/kernels-gpu.json). Two where the kernel ``dequantizes`` cartridges (at
    255 registers on sm_90 already, a third stage spills) or three do not fit in shared memory (fp32 KV).
    Above head_dim 128, 32-row tiles: 64 rows of a 256-wide accumulator spill on sm_90 (the compile test
    checks the defaults at head_dim 64, 128 and 256). Where a block gets less than ``shared_memory`` needs
    (99 KB on sm_86/sm_89), two stages, then narrower key blocks."""
    small = head_dim <= 128
    config = KernelConfig(block_m=64 if small else 32, block_n=64 if small else 32, num_stages=2 if dequantizes else 3)
    if shared_memory_bytes(config, head_dim, kv_bytes) > shared_memory:
        config = replace(config, num_stages=2)
    while shared_memory_bytes(config, head_dim, kv_bytes) > shared_memory and config.block_n > MIN_DOT:
        config = replace(config, block_n=config.block_n // 2)
    return config


# The tile configs the GPU benchmark times against the default at head_dim 128 (bench/kernels_gpu.py sweep).
# Each compiles for sm_90 without spilling in its loops (tests/kernels/test_gpu_compile.py): a spilling config
# is slow for a reason no sweep needs to measure. block_m sets how many requests a shared tile batches (16:
# 4 requests at GQA 4, more programs); block_n 128 reads a 128-token own KV in one block; own_block_n=64 is
# the own walk before OWN_BLOCK_BYTES (two round trips for a 128-token own KV). 8 warps leave one program per
# SM at these tiles' registers (the compile test prints it): (64, 64, 8, 3) lost everywhere on the H200.
# The warp-specialized and side-by-side ones come first (untimed so far): a run cut short by its time limit
# still times them. Side by side, an SM holds one own program (16-row tiles) beside a cartridge program at 3
# stages and three at 2 (shared memory and registers; the compile test prints it).
SWEEP_CONFIGS = (
    KernelConfig(64, 64, 4, 2, tma=True, warp_specialize=True),
    KernelConfig(64, 64, 4, 3, tma=True, warp_specialize=True),
    KernelConfig(64, 64, 4, 3, side_by_side=True),
    KernelConfig(64, 64, 4, 2, side_by_side=True),
    KernelConfig(64, 64, 4, 3, tma=True),
    KernelConfig(64, 64, 4, 2, tma=True),
    KernelConfig(64, 64, 4, 2),
    KernelConfig(64, 64, 4, 2, own_block_n=64),
    KernelConfig(128, 64, 8, 3),
    KernelConfig(32, 64, 4, 3),
    KernelConfig(16, 64, 4, 3),
    KernelConfig(16, 128, 4, 2),
    KernelConfig(32, 128, 8, 2),
)


def target_programs(device: torch.device) -> int:
    """Programs a launch needs to keep a CUDA device's SMs busy (two per SM); 0 elsewhere (never split)."""
    if device.type != "cuda":
        return 0
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(ctas: int, max_len: int, device: torch.device) -> int:
    """Split long segments across CTAs only when the grid would leave a CUDA device's SMs idle."""
    target = target_programs(device)
    if ctas == 0 or ctas >= target:
        return 1
    return max(1, min(math.ceil(target / ctas), max_len // MIN_KEYS_PER_SPLIT, MAX_SPLITS))

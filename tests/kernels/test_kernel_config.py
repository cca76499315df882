"""Block-size limits the interpreter does not enforce: the launcher must refuse them before launching."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from cartridges_kernels import KernelConfig, prefill_attention
from cartridges_kernels.config import (
    SHARED_MEMORY_BYTES,
    check_config,
    check_fp8_storage,
    default_config,
    dot_precision,
    own_block_n,
    shared_memory_limit,
)

from ._build import make_batch


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (KernelConfig(block_m=8), "block_m=8 must be a power of two"),
        (KernelConfig(block_m=48), "block_m=48 must be a power of two"),
        (KernelConfig(block_n=8), "block_n=8 must be a power of two"),
        (KernelConfig(block_n=512), "block_n=512"),
        (KernelConfig(num_warps=3), "num_warps=3"),
        (KernelConfig(block_m=128, num_warps=1), "accumulator registers"),
        (KernelConfig(block_m=128), "128 accumulator registers per thread with 4 warps"),  # spills on sm_90
        (KernelConfig(block_n=256, num_stages=4), "shared memory"),
        (KernelConfig(own_block_n=48), "own_block_n=48 must be a power of two"),
        (KernelConfig(own_block_n=256, num_stages=3), "own_block_n=256.*shared memory"),
    ],
)
def test_bad_configs_are_rejected(config: KernelConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_config(config, group_pad=4, head_dim=128, kv_bytes=2)


def test_launcher_checks_before_launch() -> None:
    batch = make_batch([4], [[0]], own_lens=[1], group=2, head_dim=16)
    with pytest.raises(ValueError, match="block_n=8"):
        prefill_attention(
            batch.q,
            batch.query_lens,
            batch.table,
            batch.own_kv,
            backend="triton",
            config=KernelConfig(block_n=8),
        )


def test_group_larger_than_block_is_rejected() -> None:
    with pytest.raises(ValueError, match="GQA group"):
        check_config(KernelConfig(block_m=16), group_pad=32, head_dim=64, kv_bytes=2)


def test_default_config_is_valid_for_llama_shapes() -> None:
    for head_dim in (64, 128, 256):
        for kv_bytes in (1, 2, 4):
            check_config(default_config(head_dim, kv_bytes), group_pad=4, head_dim=head_dim, kv_bytes=kv_bytes)
            check_config(default_config(head_dim, kv_bytes, dequantizes=True), 4, head_dim, kv_bytes)
    # Three pipeline stages where they fit (16-bit or 8-bit KV), two for fp32 KV at head_dim 128 or when
    # dequantizing (the kernel is at the register limit) and for fp32 at head_dim 256.
    assert [default_config(128, kv_bytes).num_stages for kv_bytes in (1, 2, 4)] == [3, 3, 2]
    assert default_config(128, 2, dequantizes=True).num_stages == 2
    assert default_config(256, 4) == KernelConfig(block_m=32, block_n=32, num_stages=2)
    with pytest.raises(ValueError, match="head_dim=512 exceeds"):  # no config fits: the message names the cause
        check_config(default_config(512), group_pad=4, head_dim=512, kv_bytes=2)


SM89_SHARED_MEMORY = 101376  # what an A10, L4 or RTX 30xx/40xx gives one block (sm_86/sm_89)


def test_default_config_fits_a_gpu_with_less_shared_memory() -> None:
    """On sm_86/sm_89 the defaults drop a stage, then halve key blocks, instead of failing to launch."""
    for head_dim in (64, 128, 256):
        for kv_bytes in (1, 2, 4):
            config = default_config(head_dim, kv_bytes, shared_memory=SM89_SHARED_MEMORY)
            check_config(config, 4, head_dim, kv_bytes, shared_memory=SM89_SHARED_MEMORY)
    assert default_config(128, 2, shared_memory=SM89_SHARED_MEMORY) == KernelConfig(num_stages=2)
    assert default_config(128, 4, shared_memory=SM89_SHARED_MEMORY) == KernelConfig(block_n=32, num_stages=2)
    assert default_config(128, 2) == KernelConfig(num_stages=3)  # the interpreter's stand-in limit: unchanged
    with pytest.raises(ValueError, match="need 131072 bytes of shared memory \\(max 101376\\)"):  # explicit
        check_config(KernelConfig(num_stages=3), 4, 128, 2, shared_memory=SM89_SHARED_MEMORY)


def test_shared_memory_limit_comes_from_the_device() -> None:
    assert shared_memory_limit(torch.device("cpu")) == SHARED_MEMORY_BYTES
    properties = SimpleNamespace(shared_memory_per_block_optin=SM89_SHARED_MEMORY)
    with mock.patch.object(torch.cuda, "get_device_properties", return_value=properties):
        assert shared_memory_limit.__wrapped__(torch.device("cuda", 0)) == SM89_SHARED_MEMORY


def test_fp8_storage_needs_sm89() -> None:
    fp8 = {torch.float8_e4m3fn, torch.bfloat16}
    with pytest.raises(ValueError, match="fp8 .* compute capability 8.9 or newer, this one is 8.6; store them as int8"):
        check_fp8_storage(fp8, (8, 6))
    check_fp8_storage(fp8, (8, 9))
    check_fp8_storage(fp8, None)  # the interpreter
    check_fp8_storage({torch.int8, torch.bfloat16}, (8, 0))


def test_fp32_dots_are_exact() -> None:
    """Triton runs fp32 dots as TF32 unless told otherwise; 16-bit ones keep its default."""
    assert dot_precision(torch.float32) == "ieee"
    assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "tf32"


@pytest.mark.parametrize(
    ("config", "head_dim", "kv_bytes", "want"),
    [
        (KernelConfig(), 128, 2, 128),  # 2 stages: a 128-token bf16 own KV in one 128-key block
        (KernelConfig(num_stages=3), 128, 2, 64),  # two staged blocks share the same bytes
        (KernelConfig(), 128, 4, 64),  # fp32
        (KernelConfig(), 256, 2, 64),
        (KernelConfig(block_n=32), 256, 4, 32),  # never below block_n
        (KernelConfig(own_block_n=16), 128, 2, 16),  # explicit
    ],
)
def test_own_block_n_keeps_one_round_trip_of_bytes(
    config: KernelConfig, head_dim: int, kv_bytes: int, want: int
) -> None:
    assert own_block_n(config, head_dim, kv_bytes) == want
    assert own_block_n(config, head_dim, kv_bytes, dequantizes=True) == (config.own_block_n or config.block_n)

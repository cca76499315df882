"""Block-size limits the interpreter does not enforce: the launcher must refuse them before launching."""

from __future__ import annotations

import pytest

from cartridges_kernels import KernelConfig, prefill_attention
from cartridges_kernels.config import check_config, default_config, own_block_n

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

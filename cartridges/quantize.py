"""Quantized storage for cartridge keys/values: int8 or fp8 (e4m3) values with float32 scales.

Cartridges are read on every decode step, so storing them in one byte per element halves the bytes the
attention kernels must read. Scales are kept per token (one per head and row) or per channel (one per head and
column); the kernels dequantize on load, and artifact tooling uses :func:`quantize_kv` to write the stored
form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

QuantFormat = Literal["int8", "fp8"]
Granularity = Literal["token", "channel"]

STORAGE_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_QMAX: dict[QuantFormat, float] = {"int8": 127.0, "fp8": 448.0}


@dataclass(frozen=True)
class QuantizedKV:
    """Keys or values of one layer, [kv_heads, tokens, head_dim], stored as int8/fp8 plus float32 scales.

    ``scales`` is [kv_heads, tokens] for ``granularity="token"`` and [kv_heads, head_dim] for ``"channel"``;
    the real value is ``data * scale`` broadcast along the other axis.
    """

    data: Tensor
    scales: Tensor
    granularity: Granularity

    def __post_init__(self) -> None:
        if self.data.dtype not in STORAGE_DTYPES.values():
            raise ValueError(f"quantized data must be int8 or float8_e4m3fn, got {self.data.dtype}")
        if self.data.dim() != 3:
            raise ValueError(f"quantized data must be [kv_heads, tokens, head_dim], got {tuple(self.data.shape)}")
        heads, tokens, head_dim = self.data.shape
        expected = (heads, tokens) if self.granularity == "token" else (heads, head_dim)
        if tuple(self.scales.shape) != expected or self.scales.dtype != torch.float32:
            raise ValueError(
                f"{self.granularity} scales must be float32 {expected}, "
                f"got {self.scales.dtype} {tuple(self.scales.shape)}"
            )
        if not bool((torch.isfinite(self.scales) & (self.scales > 0)).all()):
            # a zero, negative, infinite or NaN scale dequantizes to NaN or garbage: refuse it rather than serve it
            raise ValueError(f"{self.granularity} scales must be finite and positive")

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def format(self) -> QuantFormat:
        return "int8" if self.data.dtype == torch.int8 else "fp8"

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The real-valued tensor, as the kernels see it (used by the reference path and by tests)."""
        scales = self.scales.unsqueeze(-1) if self.granularity == "token" else self.scales.unsqueeze(1)
        return (self.data.to(torch.float32) * scales).to(dtype)


def quantize_kv(x: Tensor, fmt: QuantFormat, granularity: Granularity) -> QuantizedKV:
    """Quantize a [kv_heads, tokens, head_dim] tensor symmetrically with absmax scales.

    Per-channel suits keys (outlier channels survive RoPE); per-token suits values. Rows or columns whose scale
    would be zero (all zero, or an absmax so small that dividing it by the format's maximum underflows) get scale
    1, so they dequantize to (nearly) themselves instead of NaN; so do the channels of a tensor without tokens.
    Non-finite input has no scale and is refused.
    """
    if x.dim() != 3:
        raise ValueError(f"expected [kv_heads, tokens, head_dim], got {tuple(x.shape)}")
    reduce_dim = -1 if granularity == "token" else 1
    magnitudes = x.detach().to(torch.float32).abs()
    # no tokens (an empty cartridge or own KV): channel scales of zeros, which become ones below
    amax = magnitudes.amax(dim=reduce_dim) if magnitudes.shape[reduce_dim] else magnitudes.sum(dim=reduce_dim)
    if not bool(torch.isfinite(amax).all()):  # amax propagates NaN; float32 overflow shows as inf here too
        raise ValueError("cannot quantize keys/values that hold inf or NaN")
    scales = amax / _QMAX[fmt]
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    expanded = scales.unsqueeze(reduce_dim)
    scaled = x.to(torch.float32) / expanded
    if fmt == "int8":
        data = scaled.round().clamp(-127, 127).to(torch.int8)
    else:
        data = scaled.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return QuantizedKV(data=data.contiguous(), scales=scales.contiguous(), granularity=granularity)

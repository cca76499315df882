"""Attention kernels that compose cartridges: segmented attention over shared KV segments plus own KV.

Public API: :func:`decode_attention`, :func:`prefill_attention` (dispatch to Triton on CUDA, PyTorch
elsewhere), :class:`StepAttention` (the same for every layer of a step, checked and planned once), the inputs
:class:`SegmentTable`, :class:`KVSegment` and :class:`PooledKV` (every request's own KV in one pool;
:class:`PoolLayers` for a pool's every layer), and quantized storage via :func:`quantize_kv`.
"""

from cartridges.quantize import QuantizedKV, quantize_kv
from cartridges_kernels.config import KernelConfig
from cartridges_kernels.dispatch import BACKEND_ENV, StepAttention, decode_attention, prefill_attention
from cartridges_kernels.segments import KVSegment, PooledKV, PoolLayers, SegmentTable

__all__ = [
    "BACKEND_ENV",
    "KVSegment",
    "KernelConfig",
    "PoolLayers",
    "PooledKV",
    "QuantizedKV",
    "SegmentTable",
    "StepAttention",
    "decode_attention",
    "prefill_attention",
    "quantize_kv",
]

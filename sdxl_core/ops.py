"""Weights kept in one dtype, computed in another: ComfyUI's "manual cast" layers (`comfy/ops.py`).

A network stored in fp16 (the dtype SDXL files ship in) and run on the CPU computes in fp32: every
Linear, Conv2d, GroupNorm, LayerNorm and Embedding casts its weight and bias to the compute dtype for
the length of its own forward and drops the copy afterwards. fp16 → fp32 (and bf16 → fp32) is exact,
so each layer sees exactly the fp32 weights an fp32-stored network holds, and the outputs are the
same bits, at half the resident memory. `manual_cast(module, dtype)` switches a built network to
these layers in place (no weight is copied); the network's own `dtype` property then reports the
compute dtype, which is what its callers cast their inputs to.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from .unet import GroupNorm32


def compute_dtype(device: str | torch.device, storage: torch.dtype | None) -> torch.dtype:
    """The dtype a network stored in `storage` computes in on `device`.

    None (each tensor as the file stores it) and fp32 compute in fp32. On the CPU fp16 also computes in
    fp32: CPU fp16 kernels are slow and lossy, and the upcast is exact (ComfyUI does the same). bf16 stays
    bf16 (`--dtype bf16`, chosen for speed). On a GPU the storage dtype is the compute dtype.
    """
    if storage is None or storage == torch.float32:
        return torch.float32
    if torch.device(device).type == "cpu" and storage == torch.float16:
        return torch.float32
    return storage


_scratch = threading.local()


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`t` in `dtype`, valid until this thread's next cast (the one layer's forward that asked for it).

    Weights are cast into one reusable per-thread buffer: a fresh tensor each time would be a fresh
    memory mapping for every large weight (glibc maps blocks over 32 MB itself), paid in page faults,
    about 5× the copy itself. Non-contiguous weights (bigG's transposed projection) get their own copy
    with the same strides, so every kernel sees exactly the layout the fp32 path gives it.
    """
    if t is None or t.dtype == dtype:
        return t
    if not t.is_contiguous():
        return t.to(dtype)
    n = t.numel()
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != t.device:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buf = _scratch.buf = torch.empty(max(n, buf.numel() if buf is not None else 0), dtype=dtype,
                                             device=t.device)
    return buf[:n].view(t.shape).copy_(t)


def _cast_bias(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)  # small: its own tensor (the weight holds the scratch)


class CastLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, _cast(self.weight, x.dtype), _cast_bias(self.bias, x.dtype))


class CastConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, _cast(self.weight, x.dtype), _cast_bias(self.bias, x.dtype))


class CastGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, _cast(self.weight, x.dtype), _cast_bias(self.bias, x.dtype), self.eps)


class CastGroupNorm32(GroupNorm32, CastGroupNorm):
    """GroupNorm32's fp16 upcast, then CastGroupNorm's forward (the next class in the MRO)."""


class CastLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x.dtype), _cast_bias(self.bias, x.dtype), self.eps)


class CastEmbedding(nn.Embedding):
    """Its input is token ids, so the dtype comes from the `compute_dtype` attribute `manual_cast` sets."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids):
        if self.max_norm is None:  # the rows looked up, then cast: the same values, without casting the table
            return F.embedding(ids, self.weight, self.padding_idx).to(self.compute_dtype)
        return F.embedding(ids, _cast(self.weight, self.compute_dtype), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


CAST_CLASSES: dict[type, type] = {
    nn.Linear: CastLinear,
    nn.Conv2d: CastConv2d,
    nn.GroupNorm: CastGroupNorm,
    GroupNorm32: CastGroupNorm32,
    nn.LayerNorm: CastLayerNorm,
    nn.Embedding: CastEmbedding,
}


def manual_cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make every layer of `module` compute in `dtype` whatever its weights' dtype; returns `module`.

    Layers are switched to their cast subclass in place (the `__class__` only: same parameters, same
    state-dict keys). A module that holds a floating-point parameter directly and is not one of the
    layers above would silently compute in the storage dtype, so it is refused.
    """
    for name, m in module.named_modules():
        cls = CAST_CLASSES.get(type(m))
        if cls is not None:
            m.__class__ = cls
            if cls is CastEmbedding:
                m.compute_dtype = dtype
        elif type(m) not in CAST_CLASSES.values() and any(
            p.is_floating_point() and p.dtype != dtype for p in m.parameters(recurse=False)
        ):
            raise TypeError(f"manual_cast: {name or type(module).__name__} ({type(m).__name__}) holds weights but "
                            "has no casting version; add one to sdxl_core/ops.py CAST_CLASSES")
    module.compute_dtype = dtype  # what UNetModel.dtype / AutoencoderKL.dtype report
    return module


def for_compute(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` made to compute in `dtype`: as it is when every floating-point weight already has that
    dtype, else through `manual_cast`."""
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        manual_cast(module, dtype)
    return module

"""The CUDA fast path's pieces that are not precision: compiled UNets, channels_last, pinned uploads, and a
check of which attention kernel SDPA really runs.

* `compiled(module, backend)`: ``torch.compile`` of a network, built once per (module, backend) and kept
  while the module lives, so every run of the same shape reuses the compiled graph (``dynamic=False``:
  a new image size compiles once more and is cached beside the first). Backends are ComfyUI's
  TorchCompileModel choices, ``inductor`` and ``cudagraphs``, plus ``max-autotune`` (inductor with
  autotuned kernels and CUDA graphs: slow to build, fastest to run at a fixed shape).
* `to_channels_last(module)`: 4-D weights in NHWC order, which cuDNN's fp16/bf16 convolutions use
  natively (NCHW costs a transpose around each convolution on the GPU).
* `PinnedUploader`: host→GPU copies of a network's tensors through a reusable pinned staging buffer
  (the copy engine reads pinned memory at full bus speed and overlaps with the next tensor's read
  from the file); pageable copies are staged by the driver in small chunks instead.
* `sdpa_backends(device)`: the attention kernels our networks may use on CUDA: flash, then memory-efficient,
  then math; never cuDNN's. On an H200 with torch 2.11 SDPA picked cuDNN's kernel for our UNet and the
  fp16 run then differed from the fp32 run by 40 % (UNet eps) and 58 % (CLIP hidden states), max
  relative, where fp16 arithmetic alone gives 0.2 % (the same CLIP in fp16 on the CPU); PyTorch's tracker
  has open correctness reports against that backend on H100/H200/B200 (pytorch#196678, #193893).
* `attention_kernels(fn)`: names of the GPU kernels ``fn()`` runs that implement attention, from the
  profiler, so a benchmark can show flash / memory-efficient attention was chosen, not the math path.

Nothing here changes a result beyond the rounding of the dtype the network already runs in.
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch
from torch import nn

log = logging.getLogger(__name__)

COMPILE_BACKENDS = ("inductor", "cudagraphs", "max-autotune")

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(module: nn.Module, backend: str | None) -> nn.Module:
    """`module` compiled with `backend` (cached per module); the module itself when `backend` is None."""
    if not backend:
        return module
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"unknown compile backend '{backend}'; expected one of {', '.join(COMPILE_BACKENDS)}")
    per_module = _COMPILED.setdefault(module, {})
    if backend not in per_module:
        if backend == "max-autotune":
            fn = torch.compile(module, mode="max-autotune", dynamic=False)
        else:
            fn = torch.compile(module, backend=backend, dynamic=False)
        log.info("compiling the %s with torch.compile (%s); the first step of each new shape takes a while",
                 type(module).__name__, backend)
        per_module[backend] = fn
    return per_module[backend]


@contextlib.contextmanager
def sdpa_backends(device):
    """Inside: `F.scaled_dot_product_attention` on CUDA uses flash / memory-efficient / math kernels, not
    cuDNN's (see the module docstring). Nothing changes off CUDA. Flags are restored on exit."""
    if torch.device(device).type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def to_channels_last(module: nn.Module) -> nn.Module:
    """4-D parameters (convolution weights) in channels_last order, in place; other tensors unchanged."""
    for p in module.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return module


class PinnedUploader:
    """Copies CPU tensors to a CUDA device through two pinned staging buffers, alternating, so reading
    the next tensor overlaps with the transfer of the previous one. Tensors larger than a buffer are
    copied in pieces. The results are ordinary (contiguous) device tensors."""

    def __init__(self, device: torch.device | str, buffer_bytes: int = 256 * 1024**2):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.buffers = [torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.events = [None, None]
        self.turn = 0

    def _stage(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """src (CPU, contiguous bytes) → dst (device bytes) through the next staging buffer."""
        buf = self.buffers[self.turn]
        if self.events[self.turn] is not None:
            self.events[self.turn].synchronize()  # the copy that used this buffer last has finished
        buf[: src.numel()].copy_(src)
        with torch.cuda.stream(self.stream):
            dst.copy_(buf[: src.numel()], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[self.turn] = ev
        self.turn ^= 1

    def upload(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`t` on the device in `dtype` (cast on the CPU first only when that makes the copy smaller)."""
        if dtype is not None and t.dtype != dtype and t.element_size() > torch.empty((), dtype=dtype).element_size():
            t = t.to(dtype)
        t = t.contiguous()
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        src, dst = t.view(-1).view(torch.uint8), out.view(-1).view(torch.uint8)
        step = self.buffers[0].numel()
        for a in range(0, src.numel(), step):
            self._stage(src[a : a + step], dst[a : a + step])
        if dtype is not None and out.dtype != dtype:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)  # the bytes have arrived
            out = out.to(dtype)  # widening (fp16 file → fp32 weights): on the GPU, after the copy
        return out

    def finish(self) -> None:
        """Wait for the last transfers (the tensors are then safe to use on any stream)."""
        self.stream.synchronize()


def attention_kernels(fn) -> list[str]:
    """The distinct CUDA kernel names of attention that `fn()` launches (profiled once)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    keys = ("flash", "fmha", "attention", "attn", "efficient", "sdpa", "softmax")
    return sorted(n for n in names if any(k in n.lower() for k in keys))

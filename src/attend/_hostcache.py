"""Host copies of small device index tensors (``cu_seq_*``, ``seqused_k``), per tensor object and
version: a model calls ``varlen_attn`` once per layer with the same offsets, and each read is a
host sync that stalls the GPU queue. An in-place change bumps the version and forces a fresh read.

Keyed by ``id()`` with a weak reference to check identity (tensors compare elementwise, so they
cannot key a ``WeakKeyDictionary``); an entry goes when its tensor does. Used by the public varlen
layer (validation) and the Triton launchers (the packed work lists), so a call reads once.
"""

from __future__ import annotations

import weakref

import torch

_HOST_VALUES: dict[int, tuple] = {}


def memo_get(memo: dict, t: torch.Tensor):
    hit = memo.get(id(t))
    return hit[1] if hit is not None and hit[0]() is t else None


def memo_put(memo: dict, t: torch.Tensor, value) -> None:
    key = id(t)
    memo[key] = (weakref.ref(t, lambda _, key=key: memo.pop(key, None)), value)


def version(t: torch.Tensor) -> int | None:
    """``t._version``, or None for an inference tensor (``torch.inference_mode``), which keeps no
    version counter: nothing read from one may be kept, since it can change in place unseen."""
    return None if t.is_inference() else t._version


def host_values(t: torch.Tensor) -> list[int]:
    """``t.tolist()``, read from the device once per tensor version (every call for an inference
    tensor)."""
    v = version(t)
    if v is None:
        return t.tolist()
    hit = memo_get(_HOST_VALUES, t)
    if hit is not None and hit[0] == v:
        return hit[1]
    vals = t.tolist()
    memo_put(_HOST_VALUES, t, (v, vals))
    return vals


_SMALL: dict[tuple, torch.Tensor] = {}  # (device, dtype, values) -> small_tensor's tensor


def small_tensor(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    """A small tensor of Python ``values`` on ``device`` without waiting for the GPU: a copy from
    pageable host memory synchronizes with the device's stream first, so on CUDA the values go
    through pinned memory and an asynchronous copy (the caching host allocator keeps the pinned
    block until the copy has run). Made once per device, stream, dtype and values (the kernels'
    argument tensors: flex's list strides and capture metadata; per stream, so that a kernel never
    reads one before the copy that fills it has run on its own stream), and never an inference
    tensor, since later calls reuse it. While a CUDA graph is being captured, a tensor not made
    before is filled by kernels the graph records and kept by no one: its values exist only in
    the graph's replays (a copy recorded from a pinned block would re-read that block, recycled
    by then, at every replay). The caller must not write to it."""
    dev = device if isinstance(device, torch.device) else torch.device(device)
    cuda = dev.type == "cuda"
    key = (dev, dtype, tuple(values), torch.cuda.current_stream(dev).cuda_stream if cuda else None)
    out = _SMALL.get(key)
    if out is not None:
        return out
    if cuda and torch.cuda.is_current_stream_capturing():
        return torch.stack([torch.full((), v, dtype=dtype, device=dev) for v in values])
    if len(_SMALL) > 1024:
        _SMALL.clear()
    with torch.inference_mode(False):
        if not cuda:
            out = torch.tensor(values, dtype=dtype, device=dev)
        else:
            out = torch.tensor(values, dtype=dtype).pin_memory().to(dev, non_blocking=True)
    _SMALL[key] = out
    return out

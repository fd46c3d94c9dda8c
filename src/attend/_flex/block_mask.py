"""BlockMask (PyTorch's layout) and create_block_mask without an L x S tensor.

Layout, as in PyTorch (the core iterates these lists; docs/flex.md):
``kv_num_blocks[b, h, m]`` partial key blocks of query block ``m``, their indices first in
``kv_indices[b, h, m, :]`` (ascending, the remaining columns follow in ascending order);
``full_kv_*`` the same for blocks the mask keeps entirely (no mask work there); ``q_*`` the
transposes (per key block, the query blocks), which the backward iterates. ``b`` / ``h`` may be
1 and broadcast. int32 throughout.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import os
import weakref
from typing import Callable

import torch

from . import band as _band
from . import trace as _trace

DEFAULT_BLOCK = 128
EMPTY, PARTIAL, FULL = 0, 1, 2  # a block's status (kernels.classify_blocks writes the same codes)
_LARGE_BLOCK = 1 << 30
# create_block_mask's torch path evaluates the mask in batches of blocks of at most this many positions.
TORCH_TILE_ELEMENTS = 1 << 22


def _sliced_mask_mod_error(b, h, q_idx, kv_idx):
    raise RuntimeError("the mask_mod of a sliced BlockMask cannot be used: slicing ([]) resets it; assign the "
                       "original BlockMask's mask_mod (adjusted for the slice) to the sliced one")


def _noop(b, h, q_idx, kv_idx):
    return b.new_ones(size=(), dtype=torch.bool)


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_blocks, indices) of a dense [..., rows, cols] 0/1 block matrix: kept columns first, ascending."""
    dense = dense.to(torch.int8)
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def _dense(num: torch.Tensor, idx: torch.Tensor, cols: int) -> torch.Tensor:
    """The dense [..., rows, cols] int32 0/1 matrix of (num_blocks, indices)."""
    listed = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
    out = torch.zeros(*idx.shape[:-1], cols + 1, dtype=torch.int32, device=idx.device)
    out.scatter_(-1, torch.where(listed, idx, cols).long(), 1)
    return out[..., :cols]


def _ascending(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``idx`` with each row's first ``num`` entries in ascending order (PyTorch's BlockMask does not
    require it; the core's ragged-block rule does), the rest as they were. One sort, no host sync."""
    listed = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
    big = torch.iinfo(idx.dtype).max
    ordered = torch.where(listed, idx, big).sort(-1).values
    return torch.where(listed, ordered, idx)


def _in_range(num: torch.Tensor, idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num, idx) with each row's listed entries ascending and those at or past block ``n`` no longer
    listed. PyTorch's ``BlockMask._adjust`` can keep a block past the cropped length, and
    ``from_kv_blocks`` takes any index; the core reads a listed block without bounds masks where the
    lengths divide into blocks. No host sync."""
    idx = _ascending(num, idx)
    listed = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
    return (listed & (idx < n)).sum(-1, dtype=torch.int32), idx


def kv_in_range(kv_num, kv_idx, full_num, full_idx, kv_len: int, block_kv: int) -> tuple:
    """The kv lists (partial, then full: num and indices each; full may be None) through
    ``_in_range`` at ``kv_len`` keys. The q lists need nothing: PyTorch's and attend's derive them
    from the kv lists over the key blocks that exist."""
    n = -(-kv_len // block_kv)
    kv_num, kv_idx = _in_range(kv_num, kv_idx, n)
    if full_num is not None:
        full_num, full_idx = _in_range(full_num, full_idx, n)
    return kv_num, kv_idx, full_num, full_idx


def _transpose(num, idx):
    return _ordered(_dense(num, idx, idx.shape[-1]).transpose(-2, -1))


# kv_num_blocks -> the records (``BlockMask._record``) of how create_block_mask built the key-side
# lists it heads: the compiled op sees a BlockMask's lists, not the BlockMask (``built_lists``), and
# its backward may run after a temporary BlockMask is gone. Keyed by identity, as a tensor's ``==``
# compares elements; a record holds its tensors by weak reference.
_RECORDED = torch.utils.weak.WeakIdKeyDictionary()


def _versions(lists) -> tuple:
    return tuple(None if t is None else _version(t) for t in lists)


def _note_record(lists: tuple, lengths: tuple, block: tuple, provenance: tuple) -> None:
    record = (tuple(None if t is None else weakref.ref(t) for t in lists), _versions(lists), tuple(lengths),
              tuple(block), provenance)
    records = _RECORDED.setdefault(lists[0], [])
    if record[1:] not in [r[1:] for r in records]:
        records.append(record)


def built_lists(kv_lists, lengths: tuple, block: tuple, provenance: tuple) -> bool:
    """Whether ``kv_lists`` (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices) are
    the very tensors, unchanged since, that create_block_mask built for these lengths and block
    size from a mask tracing to ``provenance``. A copy of the lists (CUDA graphs' static inputs), a
    list replaced or changed in place answers False: the call walks the lists."""
    versions = _versions(kv_lists)
    for refs, seen, rec_lengths, rec_block, rec_provenance in _RECORDED.get(kv_lists[0], ()):
        if (seen == versions and rec_provenance == provenance and rec_lengths == tuple(lengths)
                and rec_block == tuple(block)
                and all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, kv_lists))):
            return True
    return False


def listed_band(kv_lists, mask_graph, lengths: tuple, block: tuple):
    """The band (``_flex/band.py``) whose exact blocks ``kv_lists`` are, where create_block_mask
    built them from a band mask_mod tracing to ``mask_graph`` (``built_lists``); else None. The eager
    call and the compiled op (which sees the lists, not the BlockMask) both ask this."""
    if mask_graph is None or not built_lists(kv_lists, lengths, block, _band.provenance(mask_graph)):
        return None
    return _band.band(mask_graph, *lengths)


def _version(t: torch.Tensor):
    """``t._version``, or None for an inference tensor (which keeps none)."""
    try:
        return t._version
    except RuntimeError:
        return None


class BlockMask:
    """Block-sparse attention mask in PyTorch's layout (see the module docstring).

    ``BLOCK_SIZE = (Q_BLOCK_SIZE, KV_BLOCK_SIZE)``; ``seq_lengths = (Q_LEN, KV_LEN)``. Blocks in
    the partial lists get ``mask_mod`` applied, blocks in the full lists are kept whole, and
    unlisted blocks are skipped.
    """

    def __init__(self, seq_lengths, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                 q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
                 BLOCK_SIZE=(DEFAULT_BLOCK, DEFAULT_BLOCK), mask_mod=None):
        if kv_indices.dim() < 2:
            raise RuntimeError(f"kv_indices must have at least 2 dimensions, got shape {tuple(kv_indices.shape)}")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must both be given or both be None, got "
                             f"{type(full_kv_num_blocks).__name__} and {type(full_kv_indices).__name__}")
        self.seq_lengths = tuple(seq_lengths)
        self.kv_num_blocks, self.kv_indices = kv_num_blocks, kv_indices
        self.full_kv_num_blocks, self.full_kv_indices = full_kv_num_blocks, full_kv_indices
        self.q_num_blocks, self.q_indices = q_num_blocks, q_indices
        self.full_q_num_blocks, self.full_q_indices = full_q_num_blocks, full_q_indices
        self.BLOCK_SIZE = tuple(BLOCK_SIZE)
        self.mask_mod = mask_mod if mask_mod is not None else _noop
        # (the mask_mod, its graph's provenance) create_block_mask built these lists from
        # (``_record``): then they are that mask's exact blocks, which a band mask's route needs
        # (_flex/band.py); None: not known
        self._built_from: tuple | None = None
        # (the mask_mod, the kv lists) create_block_mask built inside a compiled graph
        # (``compiled.graph_block_mask``; no weak record of a graph's tensors): a compiled call whose
        # BlockMask still holds both knows the lists are that mask's exact blocks; None elsewhere
        self._graph_lists: tuple | None = None
        # PyTorch's deterministic block-sparse dQ metadata: kept for as_tuple's shape, not produced
        self.dq_write_order = self.dq_write_order_full = self.dq_kv_order = self.dq_kv_order_spt = None

    _KV_ATTRS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")

    def _kv_lists(self) -> tuple:
        return tuple(getattr(self, a) for a in self._KV_ATTRS)

    def _record(self, mask_mod, provenance: tuple) -> None:
        """Record that these lists are ``mask_mod``'s exact blocks (its graph's ``band.provenance``;
        ``built_lists`` then knows them, for these lengths and block size)."""
        self._built_from = (mask_mod, provenance)
        _note_record(self._kv_lists(), self.seq_lengths, self.BLOCK_SIZE, provenance)

    def _lists_recorded(self) -> bool:
        """Whether a record exists and the lists, lengths and block size are still the recorded ones
        (no list replaced or changed in place since)."""
        return self._built_from is not None and built_lists(self._kv_lists(), self.seq_lengths, self.BLOCK_SIZE,
                                                            self._built_from[1])

    def _built_by_its_mask_mod(self) -> bool:
        """Whether the record names the mask_mod this BlockMask holds (one assigned since, even of
        the same mask, is not known to give these lists)."""
        return self._built_from is not None and self._built_from[0] is self.mask_mod

    _TENSOR_ATTRS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices", "full_q_num_blocks", "full_q_indices")

    @classmethod
    def from_kv_blocks(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None,
                       BLOCK_SIZE=DEFAULT_BLOCK, mask_mod=None, seq_lengths=None, compute_q_blocks=True):
        """A BlockMask from its kv lists; the q transposes are derived (``compute_q_blocks``). The
        lists are taken ascending and cut to the key blocks inside ``seq_lengths`` (``kv_in_range``)."""
        if kv_indices.dim() < 2:
            raise RuntimeError(f"kv_indices must have at least 2 dimensions, got shape {tuple(kv_indices.shape)}")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must both be given or both be None")
        block = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else BLOCK_SIZE
        kv_len = seq_lengths[1] if seq_lengths is not None else kv_indices.shape[-1] * block[1]
        lists = kv_in_range(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, kv_len, block[1])
        return cls._from_listed(*lists, BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=seq_lengths,
                                compute_q_blocks=compute_q_blocks)

    @classmethod
    def _from_listed(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None,
                     BLOCK_SIZE=DEFAULT_BLOCK, mask_mod=None, seq_lengths=None, compute_q_blocks=True):
        """``from_kv_blocks`` for lists already ascending and inside the lengths (create_block_mask's,
        a crop's or an index's of such lists): no pass over them."""
        if isinstance(BLOCK_SIZE, int):
            BLOCK_SIZE = (BLOCK_SIZE, BLOCK_SIZE)
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * BLOCK_SIZE[0], kv_indices.shape[-1] * BLOCK_SIZE[1])
        q = (None, None)
        fq = (None, None)
        if compute_q_blocks:
            q = _transpose(kv_num_blocks, kv_indices)
            if full_kv_num_blocks is not None:
                fq = _transpose(full_kv_num_blocks, full_kv_indices)
        return cls(seq_lengths, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, *q, *fq,
                   BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod)

    def as_tuple(self, flatten: bool = True) -> tuple:
        """The fields in PyTorch 2.13's order: lengths, the eight lists, the four dq_* fields (None
        here), block sizes, mask_mod (``flatten=False`` keeps lengths and sizes as pairs)."""
        lengths = self.seq_lengths if flatten else (self.seq_lengths,)
        sizes = self.BLOCK_SIZE if flatten else (self.BLOCK_SIZE,)
        return (*lengths, *(getattr(self, a) for a in self._TENSOR_ATTRS), self.dq_write_order,
                self.dq_write_order_full, self.dq_kv_order, self.dq_kv_order_spt, *sizes, self.mask_mod)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.kv_indices.shape[:-2]) + self.seq_lengths

    def numel(self) -> int:
        """Positions the mask covers, sparsity aside."""
        return functools.reduce(operator.mul, self.shape, 1)

    def sparsity(self) -> float:
        """Percentage of blocks skipped, of every (batch, head, query block, key block), a ragged
        last block counting as one: PyTorch 2.14's definition (2.13 compared block areas with L x S,
        which is off, even negative, for lengths that are not multiples of the block size)."""
        blocks = self.kv_num_blocks.sum().item()
        if self.full_kv_num_blocks is not None:
            blocks += self.full_kv_num_blocks.sum().item()
        total = math.prod(self.kv_num_blocks.shape[:-1])
        for n, block in zip(self.seq_lengths, self.BLOCK_SIZE):
            total *= -(-n // block)
        return 100 * (1 - blocks / total) if total else 0.0

    def to_dense(self) -> torch.Tensor:
        """The [..., query blocks, key blocks] int32 0/1 matrix of visited blocks."""
        dense = _dense(self.kv_num_blocks, self.kv_indices, self.kv_indices.shape[-1])
        if self.full_kv_num_blocks is not None:
            dense = dense | _dense(self.full_kv_num_blocks, self.full_kv_indices, self.full_kv_indices.shape[-1])
        return dense

    def to_string(self, grid_size=(20, 20), limit: int = 4) -> str:
        """A picture of the visited blocks: '█' all visited, '░' some, ' ' none (per grid cell)."""
        dense = self.to_dense()
        *batch, rows, cols = dense.shape
        if grid_size == -1:
            max_r, max_c = rows, cols
        elif isinstance(grid_size, int):
            max_r = max_c = grid_size
        else:
            max_r, max_c = grid_size
        rs, cs = max(1, -(-rows // max_r)), max(1, -(-cols // max_c))
        parts = []
        for k, idx in enumerate(itertools.product(*[range(n) for n in batch])):
            if k == limit:
                parts += ["...", "To print out more, set BlockMask.to_string(limit=N)",
                          "You can also index (BlockMask[batch, head]) to choose a specific batch or head"]
                break
            m = dense[idx]
            text = f"{idx}\n"
            for r in range(0, rows, rs):
                for c in range(0, cols, cs):
                    frac = m[r:r + rs, c:c + cs].float().mean().item()
                    text += ("█" if frac == 1 else " " if frac == 0 else "░") * 2
                text += "\n"
            parts.append(text)
        return "\n".join(parts)

    def __str__(self) -> str:
        return f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%, \n{self.to_string().strip()}\n)"

    def __repr__(self) -> str:
        sh = lambda t: None if t is None else tuple(t.shape)
        fields = ",\n".join(f"    {a}={sh(getattr(self, a))}" for a in self._TENSOR_ATTRS)
        return (f"BlockMask(\n{fields},\n    BLOCK_SIZE={self.BLOCK_SIZE},\n    shape={self.shape},\n"
                f"    sparsity={self.sparsity():.2f}%,\n    mask_mod={getattr(self.mask_mod, '__name__', self.mask_mod)}\n)")

    def __getitem__(self, index) -> "BlockMask":
        """Index the batch, head and query-block dims (``bm[0]``, ``bm[:, 1]``, ``bm[0, 1, idx]``);
        the result's mask_mod raises until the caller assigns one that fits the slice."""
        index = index if isinstance(index, tuple) else (index,)
        padded = (*index, slice(None), slice(None), slice(None))[:3]
        sizes = self.kv_num_blocks.shape[:3]
        index = tuple((slice(i + n, i + n + 1) if -n <= i < 0 else slice(i, i + 1)) if isinstance(i, int) else i
                      for i, n in zip(padded, sizes))
        if len(index) > self.kv_num_blocks.dim():
            raise IndexError(f"BlockMask of shape {self.shape} indexed with {len(index)} indices")
        pick = lambda t: None if t is None else t[index]
        return BlockMask._from_listed(pick(self.kv_num_blocks), pick(self.kv_indices),
                                      pick(self.full_kv_num_blocks), pick(self.full_kv_indices),
                                      BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=_sliced_mask_mod_error,
                                      seq_lengths=self.seq_lengths, compute_q_blocks=self.q_indices is not None)

    def to(self, device) -> "BlockMask":
        """A copy with every list on ``device``."""
        moved = {a: None if getattr(self, a) is None else getattr(self, a).to(device) for a in self._TENSOR_ATTRS}
        out = BlockMask(self.seq_lengths, **moved, BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod)
        if self._lists_recorded():
            out._record(*self._built_from)
        return out

    def _relabeled(self, mask_mod) -> "BlockMask":
        """A shallow copy holding ``mask_mod``, which the caller guarantees gives exactly these
        lists (the same mask over the same tensors: the transformers integration's cached
        BlockMasks, each call's mask_mod a new closure); where create_block_mask built these lists,
        the copy keeps the band route of ``_flex/band.py`` open for it."""
        import copy

        out = copy.copy(self)
        out.mask_mod = mask_mod
        out._built_from = None
        if self._lists_recorded() and mask_mod is not None:
            provenance = _band.provenance(_trace.trace_cached(mask_mod, "mask"))
            if provenance == self._built_from[1]:  # the same structure and numbers as the lists were built from
                out._built_from = (mask_mod, provenance)
        return out

    def _lists_only(self) -> "BlockMask":
        """A shallow copy without a mask_mod whose record of how its lists were built (if any) no
        longer holds the mask_mod either: what a cache keeps without keeping the mod's tensors."""
        import copy

        out = copy.copy(self)
        out.mask_mod = None
        out._built_from = (None, self._built_from[1]) if self._lists_recorded() else None
        return out

    def _adjust(self, new_q_len: int, new_kv_len: int) -> "BlockMask":
        """Crop to the upper-left ``new_q_len x new_kv_len`` corner (PyTorch's ``_adjust``)."""
        rows = -(-new_q_len // self.BLOCK_SIZE[0])
        cols = -(-new_kv_len // self.BLOCK_SIZE[1])

        def crop(num, idx):
            if num is None:
                return None, None
            dense = _dense(num, idx, idx.shape[-1])[..., :rows, :cols]
            return _ordered(dense)

        kv = crop(self.kv_num_blocks, self.kv_indices)
        full = crop(self.full_kv_num_blocks, self.full_kv_indices)
        out = BlockMask._from_listed(*kv, *full, BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod,
                                     seq_lengths=(new_q_len, new_kv_len), compute_q_blocks=self.q_indices is not None)
        if self._lists_recorded() and new_q_len <= self.seq_lengths[0] and new_kv_len <= self.seq_lengths[1]:
            out._record(*self._built_from)  # a crop lists no block the mask leaves empty, and full ones stay full
        return out


# from_torch's conversions, by id of PyTorch's BlockMask: (a weak reference to it, weak references
# to the lists it had with their version counters, what else the conversion read, attend's
# BlockMask). A call with the same object, unchanged, converts nothing; an entry goes with its
# object, and the cache keeps no list alive.
_FROM_TORCH: dict[int, tuple] = {}
_FROM_TORCH_SIZE = 16


def _lists_seen(bm) -> tuple:
    """(weak reference, version) of each of ``bm``'s lists (None for a missing one). Raises
    RuntimeError for an inference-mode tensor (no version counter)."""
    return tuple(None if t is None else (weakref.ref(t), t._version)
                 for t in (getattr(bm, a, None) for a in BlockMask._TENSOR_ATTRS))


def _same_lists(bm, seen: tuple) -> bool:
    return all((t is None) if s is None else (t is not None and s[0]() is t and t._version == s[1])
               for t, s in zip((getattr(bm, a, None) for a in BlockMask._TENSOR_ATTRS), seen))


def from_torch(bm) -> BlockMask:
    """attend's BlockMask for PyTorch's (``torch.nn.attention.flex_attention.BlockMask``): the kv
    lists ascending and cut to the key blocks that exist (``kv_in_range``), made once per object
    while its lists (the same tensors, not written since), lengths, block sizes and mask_mod stay
    the same. Lists made under ``torch.inference_mode`` (no version counter) convert every call."""
    if isinstance(bm, BlockMask):
        return bm
    try:
        rest = (tuple(bm.seq_lengths), tuple(bm.BLOCK_SIZE), bm.mask_mod)
        hit = _FROM_TORCH.get(id(bm))
        if hit is not None and hit[0]() is bm and hit[2][:2] == rest[:2] and hit[2][2] is rest[2] and \
                _same_lists(bm, hit[1]):  # mask_mod by identity
            return hit[3]
        seen = _lists_seen(bm)
    except (AttributeError, TypeError, RuntimeError):  # not a BlockMask (the checks below say why), or inference mode
        seen = None
    out = _from_torch(bm)
    if seen is not None:
        key = id(bm)

        def drop(ref, key=key):  # the object went: its entry goes
            entry = _FROM_TORCH.get(key)
            if entry is not None and entry[0] is ref:
                _FROM_TORCH.pop(key, None)

        try:
            ref = weakref.ref(bm, drop)
        except TypeError:
            return out
        for old in list(_FROM_TORCH)[:max(0, len(_FROM_TORCH) - _FROM_TORCH_SIZE + 1)]:
            _FROM_TORCH.pop(old, None)
        _FROM_TORCH[key] = (ref, seen, rest, out)
    return out


def _from_torch(bm) -> BlockMask:
    missing = [a for a in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "seq_lengths", "mask_mod") if not hasattr(bm, a)]
    if missing:
        raise TypeError(f"block_mask must be an attend or PyTorch BlockMask, got {type(bm).__name__} "
                        f"(missing {', '.join(missing)})")
    mask_mod = bm.mask_mod
    if getattr(mask_mod, "__name__", "") == "_sliced_mask_mod_error":
        mask_mod = _sliced_mask_mod_error
    lists = {a: getattr(bm, a, None) for a in BlockMask._TENSOR_ATTRS}
    # ascending (the core takes the last listed full block as the ragged one), none past the keys
    lists["kv_num_blocks"], lists["kv_indices"], lists["full_kv_num_blocks"], lists["full_kv_indices"] = \
        kv_in_range(lists["kv_num_blocks"], lists["kv_indices"], lists["full_kv_num_blocks"],
                    lists["full_kv_indices"], bm.seq_lengths[1], bm.BLOCK_SIZE[1])
    return BlockMask(bm.seq_lengths, *lists.values(), BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=mask_mod)


# ---------------------------------------------------------------------------------------------
# create_block_mask


def _arg_positive(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"create_block_mask: {name} must be a positive int (or None for B / H), got {v!r}")
    return v


def classify(graph: _trace.ModGraph, B: int, H: int, Q_LEN: int, KV_LEN: int, BQ: int, BKV: int, device,
             impl: str | None = None, bounds: bool = True) -> torch.Tensor:
    """int8 [B, H, query blocks, key blocks]: 0 empty, 1 partial, 2 full (kernels.EMPTY / PARTIAL / FULL).

    ``impl``: "triton" (the generated mask hook in a Triton kernel; on the CPU only under
    TRITON_INTERPRET=1) or "torch" (the graph evaluated over bounded tiles); None picks.
    ``bounds``: first decide what interval arithmetic can (``bounds.block_bounds``) and evaluate
    the mask only in the other blocks (False: every block, position by position).
    """
    from .bounds import UNDECIDED, block_bounds

    device = torch.device(device)
    if impl is None:
        interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        impl = "triton" if device.type == "cuda" or device.type == "cpu" and interpreted else "torch"
    NQ, NK = -(-Q_LEN // BQ), -(-KV_LEN // BKV)
    if device.type == "cuda" and device.index is None:  # "cuda" names the current device, as a tensor's "cuda:0" does
        device = torch.device("cuda", torch.cuda.current_device())
    if bounds:
        pre = block_bounds(graph, B, H, Q_LEN, KV_LEN, BQ, BKV, device)
    else:
        pre = torch.full((NQ, NK), UNDECIDED, dtype=torch.int8, device=device)
    undecided = pre == UNDECIDED
    # Whether any block is left to evaluate is a device sync on a GPU, which waits for the GPU's
    # queue (a decode or serving loop makes a BlockMask per step): the kernel is launched instead,
    # and copies the decided blocks (a mask interval arithmetic decides wholly compiles it once).
    if device.type != "cuda" and not bool(undecided.any()):
        return pre.expand(B, H, NQ, NK).contiguous()
    status = torch.empty(B, H, NQ, NK, dtype=torch.int8, device=device)
    caps = [c.tensor for c in graph.captures]
    if any(c.device != device for c in caps):
        bad = next(c for c in caps if c.device != device)
        raise ValueError(f"create_block_mask: mask_mod captures a tensor on {bad.device}, device is {device}")
    if impl == "triton":
        if BQ & (BQ - 1) or BKV & (BKV - 1):
            impl = "torch"  # tl.arange needs powers of two
    if impl == "triton":
        from . import codegen, kernels

        fns = codegen.hooks(graph, wide=codegen.wide_index(Q_LEN, KV_LEN)).functions
        args = codegen.capture_args(caps, device, grads=[], scalars=graph.scalars)
        kernels.classify_blocks[(NQ, B * H)](status, status.stride(0), status.stride(1), status.stride(2), pre,
                                             pre.stride(0), H, Q_LEN, KV_LEN, NK, args.ptrs, args.meta,
                                             MASK_MOD=fns["mask_mod"], LOAD_META=fns["load_meta"], BLOCK_Q=BQ,
                                             BLOCK_KV=BKV)
        return status
    # torch: the undecided blocks only, in batches of at most TORCH_TILE_ELEMENTS positions for all (b, h)
    status.copy_(pre.expand(B, H, NQ, NK))
    where = undecided.nonzero()  # [n, 2]: (query block, key block)
    per_batch = max(1, TORCH_TILE_ELEMENTS // (B * H * BQ * BKV))
    i32 = dict(dtype=torch.int32, device=device)
    b = torch.arange(B, **i32).view(B, 1, 1, 1, 1)
    h = torch.arange(H, **i32).view(1, H, 1, 1, 1)
    rq, rk = torch.arange(BQ, **i32).view(1, -1, 1), torch.arange(BKV, **i32).view(1, 1, -1)
    for i in range(0, where.shape[0], per_batch):
        m, n = where[i:i + per_batch, 0].to(torch.int32), where[i:i + per_batch, 1].to(torch.int32)
        q = (m.view(-1, 1, 1) * BQ + rq).view(1, 1, -1, BQ, 1)  # [1, 1, k, BQ, 1]
        kv = (n.view(-1, 1, 1) * BKV + rk).view(1, 1, -1, 1, BKV)  # [1, 1, k, 1, BKV]
        keep, = _trace.evaluate(graph, dict(b=b, h=h, q_idx=q.clamp(max=Q_LEN - 1),
                                            kv_idx=kv.clamp(max=KV_LEN - 1)), caps)
        keep = torch.as_tensor(keep, device=device).to(torch.bool) & (q < Q_LEN) & (kv < KV_LEN)
        kept = keep.expand(B, H, m.numel(), BQ, BKV).sum((3, 4), dtype=torch.int32)  # [B, H, k]
        found = torch.where(kept == BQ * BKV, 2, (kept > 0).to(torch.int32)).to(torch.int8)
        status[:, :, m.long(), n.long()] = found
    return status


def create_block_mask(mask_mod: Callable, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=DEFAULT_BLOCK,
                      _compile=False, separate_full_blocks: bool = True, *, _impl: str | None = None) -> BlockMask:
    """See :func:`attend.flex_attention.create_block_mask`."""
    if not callable(mask_mod):
        raise TypeError(f"create_block_mask: mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool, "
                        f"got {type(mask_mod).__name__}")
    B = 1 if B is None else _arg_positive("B", B)
    H = 1 if H is None else _arg_positive("H", H)
    Q_LEN, KV_LEN = _arg_positive("Q_LEN", Q_LEN), _arg_positive("KV_LEN", KV_LEN)
    BQ, BKV = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    _arg_positive("BLOCK_SIZE", BQ), _arg_positive("BLOCK_SIZE", BKV)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    graph = _trace.trace_cached(mask_mod, "mask")
    status = block_status(graph, B, H, Q_LEN, KV_LEN, BQ, BKV, device, impl=_impl)
    out = of_status(status, (Q_LEN, KV_LEN), (BQ, BKV), mask_mod, separate_full_blocks)
    out._record(mask_mod, _band.provenance(graph))
    return out


def block_status(graph: _trace.ModGraph, B: int, H: int, Q_LEN: int, KV_LEN: int, BQ: int, BKV: int, device,
                 impl: str | None = None) -> torch.Tensor:
    """The int8 [B, H, query blocks, key blocks] status of a traced mask_mod: a band's blocks by
    arithmetic (no mask evaluated, no device sync), any other mask's by :func:`classify` (``impl``
    given: always ``classify``, by that implementation)."""
    kept = _band.kept(graph, Q_LEN, KV_LEN) if impl is None else None
    if kept is not None:
        return _band.block_status(*kept, Q_LEN, KV_LEN, BQ, BKV, torch.device(device)).expand(B, H, -1, -1).contiguous()
    return classify(graph, B, H, Q_LEN, KV_LEN, BQ, BKV, device, impl=impl)


def of_status(status: torch.Tensor, lengths: tuple, block: tuple, mask_mod, separate_full_blocks: bool) -> BlockMask:
    """The BlockMask of a [B, H, query blocks, key blocks] status matrix (EMPTY / PARTIAL / FULL):
    the kv lists of each kind of block, and their transposes straight from the matrix."""
    kinds = (status == PARTIAL, status == FULL) if separate_full_blocks else (status != 0, None)
    lists = [x for t in (False, True) for m in kinds
             for x in ((None, None) if m is None else _ordered(m.transpose(-2, -1) if t else m))]
    return BlockMask(tuple(lengths), *lists, BLOCK_SIZE=tuple(block), mask_mod=mask_mod)

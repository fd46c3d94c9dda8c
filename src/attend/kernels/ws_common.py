"""What the two warp-specialized Gluon kernels (``ws.py``, the forward; ``ws_bwd.py``, dK / dV) share:
the persistent schedule (a program per SM takes tiles from a counter; the producer warp hands
each tile id to both consumers through a shared-memory ring), a band's tile order by sections of
heads that fit the L2, packed sequences' bounds, and the host TMA descriptors and row views."""

from __future__ import annotations

import dataclasses
import functools

import torch

from .versions import TensorDescriptor, gl, gluon, mbarrier, tma, tma_atomic_add, tma_load

HEAD_DIM = 128  # the one head dim both kernels serve
TBUF = 2  # slots of the tile ids the producer hands the consumers
LIST_BLOCK = 128  # a BlockMask's block, both ways, that the kernels' LISTS walk: a forward tile's queries, a key tile
GL_DTYPE = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}  # what the two kernels take
_SMEM_DTYPE = {**GL_DTYPE, torch.float32: gl.float32}  # tiles in shared memory (an fp32 dQ tile too)


@gluon.jit
def deal(t, n_blocks, n_heads, sec, BAND: gl.constexpr):
    """(head, block) of tile ``t`` of n_blocks blocks by n_heads heads. Without a band, block
    fastest. With one, sections of ``sec`` heads one after the other, heads fastest inside one."""
    if BAND:
        first = (t // (sec * n_blocks)) * sec  # the section's first head
        width = gl.minimum(sec, n_heads - first)  # the last section may be narrower
        i = t - first * n_blocks
        head = first + i % width
        block = i // width
    else:
        head = t // n_blocks
        block = t % n_blocks
    return head, block


PACKED = gl.constexpr(1)  # VARLEN: packed sequences at the offsets cu_q / cu_k
UNIFORM = gl.constexpr(2)  # VARLEN: packed sequences all of L queries and S keys, offsets computed (varlen_mode)


@gluon.jit
def sequence(b, cu_q, cu_k, L_max, S_max, VARLEN: gl.constexpr):
    """(first query row, query length, first key row, key length) of packed sequence ``b``: loaded
    from cu_q / cu_k, or where VARLEN is UNIFORM (``varlen_mode``) b * L_max, L_max, b * S_max,
    S_max, with no load in a tile's critical path."""
    if VARLEN == UNIFORM:
        q0 = b * L_max
        L = L_max
        k0 = b * S_max
        S = S_max
    else:
        q0 = gl.load(cu_q + b)
        L = gl.load(cu_q + b + 1) - q0
        k0 = gl.load(cu_k + b)
        S = gl.load(cu_k + b + 1) - k0
    return q0, L, k0, S


@gluon.jit
def list_row(list_ptrs, b, h, blk, BLOCK: gl.constexpr):
    """One row of a BlockMask's pair of lists (the kernels' LISTS): the blocks listed for block
    ``blk`` of (batch b, query head h), as (partial count, their indices' offset and step, the full
    indices' offset and step, the walk's end), partial blocks first. list_ptrs = (num_blocks,
    indices, full_num_blocks, full_indices, their 14 int32 strides as ``core._list_row`` reads them,
    0 where b / h broadcast): the key-side lists for a query block (the forward), the query-side
    ones for a key block (the dK / dV kernel). A walk position x of [0, end), in rows or keys, lies
    in the listed block ``listed_start`` names; ``BLOCK`` is the lists' block size."""
    ST = list_ptrs[4]
    blk64 = blk.to(gl.int64)
    b64 = b.to(gl.int64)
    h64 = h.to(gl.int64)
    num = b64 * gl.load(ST) + h64 * gl.load(ST + 1) + blk64 * gl.load(ST + 2)
    idx = b64 * gl.load(ST + 3) + h64 * gl.load(ST + 4) + blk64 * gl.load(ST + 5)
    step = gl.load(ST + 6).to(gl.int64)
    fnum = b64 * gl.load(ST + 7) + h64 * gl.load(ST + 8) + blk64 * gl.load(ST + 9)
    fidx = b64 * gl.load(ST + 10) + h64 * gl.load(ST + 11) + blk64 * gl.load(ST + 12)
    fstep = gl.load(ST + 13).to(gl.int64)
    n_part = gl.load(list_ptrs[0] + num)
    end = (n_part + gl.load(list_ptrs[2] + fnum)) * BLOCK
    return n_part, idx, step, fidx, fstep, end


@gluon.jit
def listed_start(list_ptrs, x, n_part, idx, step, fidx, fstep, BLOCK: gl.constexpr):
    """(where walk position ``x`` of a ``list_row`` walk lies in the sequence, whether its block is
    partial): block i = x // BLOCK of the partial list, then of the full one."""
    i = x // BLOCK
    partial = i < n_part
    if partial:
        blk = gl.load(list_ptrs[1] + idx + i * step)
    else:
        blk = gl.load(list_ptrs[3] + fidx + (i - n_part) * fstep)
    return blk * BLOCK + x % BLOCK, partial


@gluon.jit
def tile_ring(TBUF: gl.constexpr):
    """The shared-memory ring through which the producer hands tile ids to both consumers
    (``publish`` / ``take``): (ids, full barriers, empty barriers), initialized."""
    tid_smem = gl.allocate_shared_memory(gl.int32, [TBUF, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    tid_full = gl.allocate_shared_memory(gl.int64, [TBUF, 1], mbarrier.MBarrierLayout())
    tid_empty = gl.allocate_shared_memory(gl.int64, [TBUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(TBUF):
        mbarrier.init(tid_full.index(i), count=1)
        mbarrier.init(tid_empty.index(i), count=2)  # both consumers read a tile id
    return tid_smem, tid_full, tid_empty


@gluon.jit
def publish(tid_smem, tid_full, tid_empty, t, it, TBUF: gl.constexpr):
    """The producer hands tile ``t``, its ``it``-th, to both consumers through slot it % TBUF."""
    slot = it % TBUF
    mbarrier.wait(tid_empty.index(slot), ((it // TBUF) & 1) ^ 1, pred=it >= TBUF)
    tid_smem.index(slot).store(gl.full([1], t, gl.int32, gl.BlockedLayout([1], [32], [1], [0])))
    mbarrier.arrive(tid_full.index(slot))


@gluon.jit
def next_tile(counter_ptr, P, n_tiles, tid_smem, tid_full, tid_empty, it, TBUF: gl.constexpr):
    """The producer's ``it``-th tile: the counter's next untaken one (the first P went to the
    programs' own ids), published to both consumers. A producer takes once per tile it ran, so the
    launch takes n_tiles times in all (n_tiles - P tiles, then each program's last, past the end):
    the program whose take is the n_tiles-th sets the counter back to 0, which no other program
    reads again, for the next launch on the stream (``persistent``)."""
    taken = gl.atomic_add(counter_ptr, 1)
    if taken == n_tiles - 1:
        gl.atomic_xchg(counter_ptr, 0)
    t = P + taken
    publish(tid_smem, tid_full, tid_empty, t, it, TBUF)
    return t


@gluon.jit
def take(tid_smem, tid_full, tid_empty, it, TBUF: gl.constexpr):
    """A consumer's ``it``-th tile, as the producer published it."""
    slot = it % TBUF
    mbarrier.wait(tid_full.index(slot), (it // TBUF) & 1)
    t = gl.max(tid_smem.index(slot).load(gl.BlockedLayout([1], [32], [4], [0])), 0)
    mbarrier.arrive(tid_empty.index(slot))
    return t


@gluon.jit
def tma_add_tile(src_desc, dst_desc):
    """Add ``src``'s first box into ``dst``'s first box by a TMA reduce-add (``versions.tma_atomic_add``):
    the primitive with which the dK / dV kernel's consumers add dQ (ws_bwd's FUSED_DQ), alone. The
    build check compiles it and the GPU tests run it."""
    smem = gl.allocate_shared_memory(src_desc.dtype, src_desc.block_type.shape, src_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bar.index(0), count=1)
    mbarrier.expect(bar.index(0), src_desc.block_type.nbytes)
    tma_load(src_desc, [0, 0], bar.index(0), smem)
    mbarrier.wait(bar.index(0), 0)
    tma_atomic_add(dst_desc, [0, 0], smem)
    tma.store_wait(0)
    mbarrier.invalidate(bar.index(0))


@functools.lru_cache(maxsize=None)
def smem_layout(rows: int, cols: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for([rows, cols], _SMEM_DTYPE[dtype])


def descriptor(t: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
    """A host TMA descriptor of [rows, cols] boxes over the 2-D tensor ``t`` (or ``t`` contiguous,
    seen as 2-D with its leading dims as rows)."""
    if t.dim() == 2:
        shape, strides = list(t.shape), list(t.stride())
    elif t.is_contiguous():  # its rows without a reshaped view (the descriptor reads the base's pointer and dtype)
        n = t.shape[-1]
        shape, strides = [t.numel() // max(n, 1), n], [n, 1]
    else:
        t = t.reshape(-1, t.shape[-1])
        shape, strides = list(t.shape), list(t.stride())
    return build_descriptor(t, shape, strides, [rows, cols], _checked_layout(rows, cols, t.dtype))


# TensorDescriptor's fields that have defaults (padding; Triton 3.9 adds round_f32_to_tf32), set as
# the dataclass's __init__ sets them (a default_factory's field, which none has yet, by calling it).
_DESCRIPTOR_FIELDS = () if TensorDescriptor is None else dataclasses.fields(TensorDescriptor)
_DESCRIPTOR_DEFAULTS = {f.name: f.default for f in _DESCRIPTOR_FIELDS if f.default is not dataclasses.MISSING}
_DESCRIPTOR_FACTORIES = {f.name: f.default_factory for f in _DESCRIPTOR_FIELDS
                         if f.default_factory is not dataclasses.MISSING}


def checked_layout(layout, box: list, dtype: torch.dtype):
    """``layout`` for ``box``es of ``dtype``, checked by TensorDescriptor's own validation (the box,
    the layout and the element width, which depend on no tensor): once per box, where
    ``build_descriptor`` leaves them out."""
    t = torch.empty(box, dtype=dtype, device="meta")
    TensorDescriptor(t, list(t.shape), list(t.stride()), list(box), layout)
    return layout


@functools.lru_cache(maxsize=None)
def _checked_layout(rows: int, cols: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """``smem_layout``, checked once per box (``checked_layout``)."""
    return checked_layout(smem_layout(rows, cols, dtype), [rows, cols], dtype)


def build_descriptor(base: torch.Tensor, shape: list, strides: list, box: list, layout) -> TensorDescriptor:
    """``TensorDescriptor(base, shape, strides, box, layout)`` without the dataclass's validation on
    every call: about 1 us of a launch's host time per descriptor, five per forward. The checks that
    depend on the tensor are made here (a 16-byte aligned base and strides, a unit last stride, a
    nonempty shape); those of the box and layout, which do not, once per box (``checked_layout``)."""
    item = base.element_size()
    if (base.data_ptr() % 16 or strides[-1] != 1 or any(s * item % 16 for s in strides[:-1])
            or min(shape) <= 0):
        raise ValueError(f"a TMA descriptor needs a 16-byte aligned base and strides, a unit last stride and a "
                         f"nonempty shape; got shape {shape}, strides {strides} ({base.dtype}), base "
                         f"{base.data_ptr():#x}")
    d = object.__new__(TensorDescriptor)
    d.__dict__.update(_DESCRIPTOR_DEFAULTS, base=base, shape=shape, strides=strides, block_shape=box, layout=layout)
    for name, factory in _DESCRIPTOR_FACTORIES.items():
        setattr(d, name, factory())
    return d


def row_view(t: torch.Tensor, packed: bool) -> torch.Tensor:
    """The 2-D row view the kernel addresses: (B * H * L, D) dense; (T, H * D) packed, from a
    (T, H, D) tensor or its (1, H, T, D) view."""
    if packed:
        t = t[0].transpose(0, 1) if t.dim() == 4 else t
        return t.reshape(t.shape[0], -1)
    return t.reshape(-1, t.shape[-1])


def model_rows(t: torch.Tensor) -> torch.Tensor:
    """The (B * L, H * D) rows of a model's (B, H, L, D) view of a (B, L, H, D) tensor (Q_ROWS: a
    head is a column offset); a view, never a copy (the kernels write some of these)."""
    return t.transpose(1, 2).view(t.shape[0] * t.shape[2], t.shape[1] * t.shape[3])


L2_BUDGET = 16 << 20  # bytes a band's section of heads may stream from L2 (the H100's holds 50 MiB)


def section(n_heads: int, rows: int, share: float, q: torch.Tensor) -> int:
    """Heads per section of a band's tile order (``_tile``, ``ws_bwd._kv_tile``): as many as
    L2_BUDGET holds the two tensors a head's tiles stream, ``rows`` long, ``share`` of them per head
    (the forward's K and V: S_max rows, Hkv / H as grouped heads share them; the dK / dV kernel's Q
    and dO: L_max rows of the G query heads of a KV head)."""
    per_head = 2 * rows * q.shape[-1] * q.element_size() * share
    return max(1, min(n_heads, int(L2_BUDGET // max(per_head, 1))))


@functools.lru_cache(maxsize=None)
def sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent(n_tiles: int, device: torch.device) -> tuple[tuple, torch.Tensor]:
    """(grid, counter) of a persistent launch: one program per SM (fewer when there are fewer
    tiles), and the int32 they take tiles from after their own (the next tile, less the grid), 0 at
    launch. The kernels set it back to 0 as they finish (``next_tile``), so the launches on one
    stream share one, made once (a ``torch.zeros`` per launch was an allocation and a fill kernel
    launched before each). Under a CUDA graph's capture the capture gets its own, as before."""
    grid = (min(n_tiles, sm_count(device.index)),)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():  # (CPU: the launch checks that stub it)
        return grid, torch.zeros(1, dtype=torch.int32, device=device)
    index = torch.cuda.current_device()  # where the launcher launches (fastlaunch.Launcher): its stream
    key = (index, torch._C._cuda_getCurrentRawStream(index))
    counter = _COUNTERS.get(key)
    if counter is None:
        if len(_COUNTERS) >= 64:  # many streams come and go: a dropped counter's memory is reused in its stream's order
            _COUNTERS.clear()
        counter = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=torch.device("cuda", index))
    return grid, counter


_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}  # (device, raw stream) -> the stream's tile counter


def varlen_mode(packed) -> int:
    """The kernels' VARLEN constexpr: 0 dense, PACKED for packed sequences (offsets read from
    cu_q / cu_k per tile), UNIFORM for packed sequences that all have L queries and S keys (a
    model's row views: the offsets are b * L and b * S, so a tile starts without its four offset
    loads)."""
    if packed is None:
        return 0
    return UNIFORM.value if packed.uniform else PACKED.value


def hook_constexprs(fns: dict | None, derivative: bool) -> dict:
    """The Gluon kernels' score-hook constexprs: HAS_SCORE, SCORE_MOD, LOAD_SCORE_META and, with
    ``derivative`` (the dK / dV kernel), SCORE_DSCORE, from a flex score_mod's generated functions
    (``codegen.Hooks.functions``), or False without one (not None: Triton 3.9's warp_specialize takes
    no None among a partition's arguments, and its ``if`` takes only bools)."""
    fns = fns or {}
    out = dict(HAS_SCORE=bool(fns), SCORE_MOD=fns.get("score_mod", False), LOAD_SCORE_META=fns.get("load_meta", False))
    if derivative:
        out["SCORE_DSCORE"] = fns.get("score_mod_dscore", False)
    return out


def hook_args(score, dummy: torch.Tensor) -> dict:
    """The score hooks' runtime arguments: a flex score_mod's (generated functions,
    ``codegen.CaptureArgs``) captures and meta, or placeholders never read (``dummy`` for the meta)."""
    return dict(score_ptrs=score[1].ptrs if score else (), score_meta=score[1].meta if score else dummy)


def list_args(lists: tuple | None, mask, dummy: torch.Tensor) -> dict:
    """The LISTS kernels' runtime arguments: a BlockMask's five lists (``list_row``'s list_ptrs) and a
    flex mask_mod's (generated functions, ``codegen.CaptureArgs``) captures and meta, or placeholders
    never read (``dummy`` for the meta)."""
    return dict(list_ptrs=lists if lists is not None else (), mask_ptrs=mask[1].ptrs if mask else (),
                mask_meta=mask[1].meta if mask else dummy)


def list_constexprs(lists: tuple | None, mask) -> dict:
    """The LISTS kernels' constexprs: LISTS, and HAS_MASK_MOD / MASK_MOD / LOAD_MASK_META from the
    mask_mod's generated functions (its hooks are called only where lists are walked), or False."""
    fns = mask[0] if mask and lists is not None else {}
    return dict(LISTS=lists is not None, HAS_MASK_MOD=bool(fns), MASK_MOD=fns.get("mask_mod", False),
                LOAD_MASK_META=fns.get("load_meta", False))


def cu_seqs(packed, dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seq_q, cu_seq_k) a kernel reads for packed sequences (the queries' when the call gave no
    keys' own); ``dummy`` for both when dense (never read)."""
    if packed is None:
        return dummy, dummy
    return packed.cu_q, packed.cu_k if packed.cu_k is not None else packed.cu_q

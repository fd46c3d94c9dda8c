"""Where each rank's tokens sit in the global sequence, and the functions that shard, pad and
unshard a sequence in a layout.

``layout="zigzag"``: the sequence is cut into ``2N`` equal chunks (``N`` ranks); rank ``r``
holds chunks ``r`` and ``2N-1-r``, in that order. Under a causal mask every rank then sees
``2N+1`` of the ``(2N)^2`` chunk pairs, so the work is balanced.
``layout="contiguous"``: ``N`` chunks, rank ``r`` holds chunk ``r``; under a causal mask rank
``r`` has ``r+1`` chunks of work, so the last rank sets the pace.

Example, 8 tokens over 2 ranks::

    zigzag      rank 0: [0 1 | 6 7]   rank 1: [2 3 | 4 5]
    contiguous  rank 0: [0 1 2 3]     rank 1: [4 5 6 7]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(repr(x) for x in LAYOUTS)}; got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    """How many chunks of the sequence each rank holds: 2 (zigzag) or 1 (contiguous)."""
    return 2 if check_layout(layout) == "zigzag" else 1


def chunk_ids(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """The global chunk indices rank ``rank`` holds, in the order its shard stores them."""
    return (rank, 2 * world_size - 1 - rank) if chunks_per_rank(layout) == 2 else (rank,)


def padded_length(seq_len: int, world_size: int, layout: str = "zigzag") -> int:
    """The smallest length >= ``seq_len`` that ``layout`` can split over ``world_size`` ranks
    (a multiple of ``2 * world_size`` for zigzag, of ``world_size`` for contiguous)."""
    unit = world_size * chunks_per_rank(layout)
    return -(-seq_len // unit) * unit


def _group_rank(group, rank, world_size) -> tuple[int, int]:
    """(rank, world_size): given explicitly (both, and no group), or those of ``group`` (the default
    group when None) in an initialized process group."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError(f"pass rank and world_size together (got rank={rank!r}, world_size={world_size!r}), "
                             "or neither to use the process group's")
        for name, value in (("rank", rank), ("world_size", world_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) and world_size >= 1; got rank={rank}, "
                             f"world_size={world_size}")
        if group is not None:
            size = _dist_group_size(group)
            if size != world_size:
                raise ValueError(f"world_size={world_size} but group has {size} ranks; pass one or the other")
        return rank, world_size
    from .ring import group_rank_and_size

    return group_rank_and_size(group, "shard")


def _dist_group_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def _seq_dim(x: torch.Tensor, dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor; got {dim!r}")
    return dim % x.dim()


def _check_divisible(x: torch.Tensor, d: int, world_size: int, layout: str) -> int:
    """The chunk size; a ValueError when ``x``'s length on ``d`` does not split evenly."""
    n = x.shape[d]
    unit = world_size * chunks_per_rank(layout)
    if n % unit:
        raise ValueError(f"x has {n} tokens on dim {d}; layout={layout!r} over {world_size} ranks needs a multiple "
                         f"of {unit}. Pad it first: pad_for_sharding(x, dim={d}, world_size={world_size}) gives "
                         f"{padded_length(n, world_size, layout)} tokens, then pass seq_len={n} to "
                         "context_parallel_attention so the padding is masked")
    return n // unit


def shard_positions(seq_len: int, *, rank: int, world_size: int, layout: str = "zigzag",
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The global positions (int64, ``seq_len // world_size`` of them) of the tokens rank ``rank``
    holds, in its shard's order: what rotary embeddings need as ``position_ids``."""
    unit = world_size * chunks_per_rank(layout)
    if seq_len % unit:
        raise ValueError(f"seq_len={seq_len} is not a multiple of {unit} (layout={layout!r} over {world_size} ranks)")
    c = seq_len // unit
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_ids(rank, world_size, layout)])


def shard(x: torch.Tensor, *, dim: int, group=None, rank: int | None = None, world_size: int | None = None,
          layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim`` in ``layout`` (a new tensor).

    The rank and world size are those of ``group`` (the default group when None), or
    ``rank``/``world_size`` given explicitly (no process group needed). ``x.shape[dim]`` must be a
    multiple of ``2 * world_size`` (zigzag) or ``world_size`` (contiguous); ``pad_for_sharding``
    pads it. Gradients flow back to ``x``.

    Example (zigzag, 2 ranks): ``x = [t0 .. t7]`` -> rank 0 ``[t0 t1 t6 t7]``, rank 1 ``[t2 t3 t4 t5]``.
    """
    layout = check_layout(layout)
    d = _seq_dim(x, dim)
    r, n = _group_rank(group, rank, world_size)
    c = _check_divisible(x, d, n, layout)
    return torch.cat([x.narrow(d, i * c, c) for i in chunk_ids(r, n, layout)], dim=d)


def pad_for_sharding(x: torch.Tensor, *, dim: int, group=None, world_size: int | None = None,
                     layout: str = "zigzag", value: float = 0.0) -> torch.Tensor:
    """``x`` padded at the end of ``dim`` with ``value`` to ``padded_length`` (``x`` itself when it
    already fits). Pass the unpadded length as ``seq_len`` to ``context_parallel_attention``: keys
    past it are masked and query rows past it return 0."""
    layout = check_layout(layout)
    d = _seq_dim(x, dim)
    if world_size is None:
        _, world_size = _group_rank(group, None, None)
    elif group is not None and _dist_group_size(group) != world_size:
        size = _dist_group_size(group)
        raise ValueError(f"world_size={world_size} but group has {size} ranks; pass one or the other")
    n = x.shape[d]
    pad = padded_length(n, world_size, layout) - n
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[d] = pad
    return torch.cat([x, x.new_full(shape, value)], dim=d)


def unshard(x: torch.Tensor | Sequence[torch.Tensor], *, dim: int, group=None, layout: str = "zigzag",
            seq_len: int | None = None) -> torch.Tensor:
    """The whole sequence from its shards along ``dim``: the inverse of ``shard``.

    ``x`` is either the list of every rank's shard, in rank order (no communication), or this
    rank's shard, which is then all-gathered over ``group`` (every rank of it must call; every
    rank gets the whole sequence; the gather is not differentiable). ``seq_len`` trims the
    padding ``pad_for_sharding`` added.
    """
    layout = check_layout(layout)
    if isinstance(x, torch.Tensor):
        import torch.distributed as dist

        _, n = _group_rank(group, None, None)
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=group)
    else:
        parts = list(x)
        if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
            raise TypeError("x must be a tensor (this rank's shard) or a non-empty list of tensors (every "
                            "rank's shard)")
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"every shard must have the same shape; got {[tuple(p.shape) for p in parts]}")
    n = len(parts)
    d = _seq_dim(parts[0], dim)
    per = chunks_per_rank(layout)
    if parts[0].shape[d] % per:
        raise ValueError(f"each shard has {parts[0].shape[d]} tokens on dim {d}; layout={layout!r} needs a multiple of "
                         f"{per}")
    c = parts[0].shape[d] // per
    owner = {}  # global chunk -> (rank, slot in its shard)
    for r in range(n):
        for slot, i in enumerate(chunk_ids(r, n, layout)):
            owner[i] = (r, slot)
    whole = torch.cat([parts[owner[i][0]].narrow(d, owner[i][1] * c, c) for i in range(n * per)], dim=d)
    if seq_len is not None:
        if not 0 <= seq_len <= whole.shape[d]:
            raise ValueError(f"seq_len={seq_len} is out of range for {whole.shape[d]} gathered tokens")
        whole = whole.narrow(d, 0, seq_len)
    return whole

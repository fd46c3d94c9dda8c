"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

``context_parallel_attention`` runs ring attention on ``torch.distributed`` P2P (NCCL on GPUs,
gloo on the CPU) with attend's fused kernels for each block (flex's core with score_mod /
mask_mod at global positions); ``shard`` / ``unshard`` /
``pad_for_sharding`` / ``shard_positions`` move a sequence in and out of a layout. See
docs/distributed.md.
"""

from .layout import LAYOUTS, pad_for_sharding, padded_length, shard, shard_positions, unshard
from .ring import RingStats, context_parallel_attention, record_ring_stats

__all__ = ["context_parallel_attention", "shard", "unshard", "pad_for_sharding", "padded_length", "shard_positions",
           "LAYOUTS", "record_ring_stats", "RingStats"]

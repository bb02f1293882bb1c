"""The gallery beyond one machine: coarse-to-fine search (Sec. 3.1) over shards held by Ray actors, with
exactly the answers of one :class:`~ctfreid.search.index.CtFIndex` (the ``ray`` extra: ``pip install
"ctfreid[ray]"``). See docs/scaling.md for the sizing and latency model."""

from ctfreid.distributed.sharded import ShardedHits, ShardedIndex, ShardsUnavailable

__all__ = ["ShardedIndex", "ShardedHits", "ShardsUnavailable"]

"""Several GPUs through ``torch.distributed``: partitioned weight streaming, one process per GPU.

Each of N ranks pins 1/N of every decoder layer (:mod:`.shards`), copies its shard over its own host link into a
ring slot and all-gathers the other shards over the GPU interconnect (:mod:`.partitioned`); compute is unchanged,
so logits are bitwise those of one-GPU streaming, and each rank serves its own sessions. :mod:`.group` sets up the
process group (NCCL on GPUs, gloo on CPUs, NVLink multicast off); :mod:`.launch` starts N ranks on one host (or runs
under ``torchrun``). Measurements and their history: ``docs/notes/distributed.md``.
"""

from djinn_core.distributed.group import RankGroup, destroy_group, free_port, init_group
from djinn_core.distributed.partitioned import (PartitionedStreamedModel, ShardedWeightRing,
                                                build_partitioned_streamed_model, check_node_host_ram,
                                                partitioned_plan, seeded_layer_fill)
from djinn_core.distributed.shards import ShardPack, gathered_layout, pack_layer_shards, shard_bytes_for, shard_range

__all__ = [
    "PartitionedStreamedModel", "RankGroup", "ShardPack", "ShardedWeightRing", "build_partitioned_streamed_model",
    "check_node_host_ram", "destroy_group", "free_port", "gathered_layout", "init_group", "pack_layer_shards",
    "partitioned_plan", "seeded_layer_fill", "shard_bytes_for", "shard_range",
]

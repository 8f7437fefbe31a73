"""Data parallel through ``msrun``: communication setup, rank/world, small host-side reductions.

``msrun`` starts one process per worker and sets ``MS_ROLE``/``MS_WORKER_NUM``/``RANK_ID``; we
then call ``mindspore.communication.init()``, which picks the backend for the device (HCCL on
Ascend, mccl on CPU — there is no gloo).  The gradient all-reduce itself runs inside the jitted
train step (``ops.AllReduce`` over the gradient tuple); this module only provides setup and a
scalar all-reduce for the host (e.g. the loss-token count of an on-policy batch).

Run without ``msrun`` the trainer is a single process (rank 0 of 1) and never touches the
communication library.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass
class WorldInfo:
    rank: int = 0
    size: int = 1
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_msrun() -> bool:
    return os.environ.get("MS_ROLE") == "MS_WORKER" or "MS_WORKER_NUM" in os.environ


def init_world() -> WorldInfo:
    """Join the msrun job if there is one (call after the device is set)."""
    if not launched_by_msrun():
        return WorldInfo()
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    init()
    backend = {"Ascend": "hccl", "GPU": "nccl"}.get(ms.get_context("device_target"), "mccl")
    return WorldInfo(get_rank(), get_group_size(), backend)


def all_reduce_sum(value: float, world: WorldInfo) -> float:
    """Sum a host scalar over all ranks (PyNative collective; only when world.size > 1)."""
    if world.size == 1:
        return float(value)
    from mindspore import Tensor, ops

    return float(ops.AllReduce()(Tensor(np.asarray([value], np.float32))).asnumpy()[0])


def barrier(world: WorldInfo) -> None:
    if world.size > 1:
        all_reduce_sum(0.0, world)

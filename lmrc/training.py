"""Moved: the run folder's plumbing is lmrc.run_folder, batch order and learning-rate schedule lmrc.schedule, the
distributed engine lmrc.distributed. These names stay importable here until every importer has switched."""

from lmrc.distributed import distributed_engine
from lmrc.run_folder import StopRequest, capture_rng, changed_setting, flatten, restore_rng
from lmrc.schedule import length_grouped_batches, linear_schedule

__all__ = [
    "StopRequest",
    "capture_rng",
    "changed_setting",
    "distributed_engine",
    "flatten",
    "length_grouped_batches",
    "linear_schedule",
    "restore_rng",
]

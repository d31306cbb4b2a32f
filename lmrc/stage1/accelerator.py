"""The processes stage 1 trains on: the Accelerator (DDP or one process), its precision, the process-wide torch
settings of a run, and the small all-reduce every step needs."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

from lmrc.errors import LmrcError
from lmrc.machine.hardware import cpu_capability, resolve_mixed_precision
from lmrc.stage1.config import Stage1Config
from lmrc.training.distributed import launched_with

log = logging.getLogger(__name__)

# What `accelerate launch` sets for an engine other than DDP (a config file or a node's default config).
_SHARDED_ENGINE_ENV = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


@contextlib.contextmanager
def torch_settings(num_threads: int | None, deterministic: bool):
    """Process-wide torch settings for the run, restored afterwards."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if num_threads:
        torch.set_num_threads(num_threads)
    if deterministic:
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def refuse_sharded_engine() -> None:
    """Stage 1 trains with DDP (or one process) only: one line instead of a failure deep inside the engine.

    Why: under DeepSpeed ZeRO-3 `prepare(model, optimizer)` without a dataloader fails on the "auto" micro-batch,
    and under FSDP the whole Stage1Model becomes one unit whose `state_dict()` on rank 0 reads sharded views. A
    RoBERTa-large classifier fits any training GPU, so sharding buys nothing; the accelerate configs in
    configs/accelerate are for stage 2 (scripts/launch.sh does not pass them to stage 1)."""
    for var, name in _SHARDED_ENGINE_ENV.items():
        if launched_with(var):
            raise LmrcError(
                f"stage 1 trains with DDP only, but accelerate launch set up {name} ({var}); launch it with "
                "`accelerate launch --multi_gpu` (scripts/train_stage1.sh does), the FSDP / DeepSpeed configs "
                "are for stage 2"
            )
    if AcceleratorState._shared_state and AcceleratorState().distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.FSDP,
        DistributedType.MEGATRON_LM,
    ):
        raise LmrcError(
            f"stage 1 trains with DDP only, but this process's accelerate state is "
            f"{AcceleratorState().distributed_type.value}; run stage 1 in its own `accelerate launch --multi_gpu`"
        )


def make_accelerator(cfg: Stage1Config, mixed_precision: str, cuda: bool) -> Accelerator:
    """The run's Accelerator: DDP that tolerates unused parameters (a batch whose documents have no entity pairs
    leaves the heads without gradient), and a process group whose collectives wait `train.ddp_timeout` seconds.

    The timeout must be given here, where the process group is created: NCCL's default of 10 minutes would
    otherwise apply while rank 0 downloads or loads the encoder and the other ranks wait at the barrier."""
    return Accelerator(
        cpu=not cuda,
        mixed_precision=mixed_precision,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True),
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.ddp_timeout)),
        ],
    )


def start_accelerator(cfg: Stage1Config) -> Accelerator:
    """The Accelerator with the run's precision: `train.mixed_precision` resolved for this machine (fp16 needs
    CUDA; bf16 autocast also runs on CPUs, 2x faster where avx512_bf16/AMX exist)."""
    refuse_sharded_engine()
    cuda = torch.cuda.is_available()
    mp = resolve_mixed_precision(cfg.train.mixed_precision, cuda)
    log.info(
        "mixed precision: %s (train.mixed_precision=%s, CPU %s)",
        mp,
        cfg.train.mixed_precision,
        cpu_capability(),
    )
    if mp == "fp16" and not cuda:
        log.info("mixed_precision=fp16 needs CUDA; training in float32 on the CPU")
        mp = "no"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process may train several models (cross-fitting, lmrc compare, tests) with different precisions;
        # accelerate keeps one global state and refuses a second mixed_precision unless it is reset.
        AcceleratorState._reset_state(reset_partial_state=True)
    return make_accelerator(cfg, mp, cuda)


def global_loss(accelerator: Accelerator, local: float, stop: bool) -> tuple[float, bool]:
    """The step loss over all processes, and whether any process was asked to stop (one small all-reduce; the
    same values on every process)."""
    if accelerator.num_processes == 1:
        return local, stop
    t = torch.tensor([local, float(stop)], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(t, "sum")
    return float(total[0]), bool(total[1] > 0)


def scaler_state(accelerator: Accelerator) -> dict[str, Any] | None:
    """The fp16 loss scaler's state as JSON (None without one)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return None
    return {k: (float(v) if hasattr(v, "item") else v) for k, v in scaler.state_dict().items()}

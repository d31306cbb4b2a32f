"""How stage 2 runs on the hardware: the process group, the distributed engine's limits, and the precision.

`accelerate launch` / `torchrun` choose the engine (DDP, FSDP or DeepSpeed ZeRO-3, `lmrc.training.
distributed_engine`); what the engine cannot train is refused here in one line, before any model is loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from typing import Any

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState

from lmrc.errors import LmrcError
from lmrc.stage2.config import Stage2Config
from lmrc.stage2.modeling import resolve_dtype

# DeepSpeed's first release whose ZeRO-3 keeps frozen parameters gathered during a non-reentrant checkpoint
# recompute (deepspeedai/DeepSpeed#8148, in 0.19.3): older ones fail LoRA + gradient checkpointing with
# "CheckpointError: Recomputed values ... have different metadata" (huggingface/transformers#47254).
DEEPSPEED_CHECKPOINTING_MIN = (0, 19, 3)


def join_processes(cfg: Stage2Config, cuda: bool) -> PartialState:
    """accelerate's process state; under torchrun / accelerate launch it creates the process group, with
    collectives that wait `train.ddp_timeout` seconds.

    The timeout must be given here: this is the first PartialState of the process, so the Trainer's own (from
    TrainingArguments.ddp_timeout) finds the group made, and NCCL's 10-minute default would apply while rank 0
    downloads or loads a 13B model and the others wait at the barrier."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # A stage-1 run earlier in this process (lmrc compare) may have left accelerate's global state in bf16
        # autocast; stage 2 sets its precision through the weights' dtype and the Trainer's arguments.
        AcceleratorState._reset_state(reset_partial_state=True)
    return PartialState(cpu=not cuda, timeout=timedelta(seconds=cfg.train.ddp_timeout))


def check_engine(cfg: Stage2Config, engine: str) -> None:
    """Refuse, in one line and before any model is loaded, what the distributed engines cannot train.

    - QLoRA under FSDP or ZeRO-3: the 4-bit base is placed whole on each GPU (`device_map`) and its packed uint8
      storage cannot be flattened (FSDP) or partitioned (ZeRO-3) without `bnb_4bit_quant_storage`, which lmrc does
      not set up; one GPU per process with DDP trains QLoRA, or drop load_in_4bit and shard the 16-bit base.
    - LoRA + gradient checkpointing under DeepSpeed releases before 0.19.3 (see DEEPSPEED_CHECKPOINTING_MIN).
    """
    if cfg.load_in_4bit and engine in ("fsdp", "deepspeed"):
        name = "FSDP" if engine == "fsdp" else "DeepSpeed"
        raise LmrcError(
            f"load_in_4bit (QLoRA) does not train under {name}: launch without the FSDP / DeepSpeed config "
            "(QLoRA fits a 13B model on one GPU per process), or set load_in_4bit: false to shard the 16-bit model"
        )
    if engine == "deepspeed" and cfg.train.gradient_checkpointing:
        version = _installed_version("deepspeed")
        if version is not None and version < DEEPSPEED_CHECKPOINTING_MIN:
            need = ".".join(map(str, DEEPSPEED_CHECKPOINTING_MIN))
            raise LmrcError(
                f"train.gradient_checkpointing with LoRA under DeepSpeed ZeRO-3 needs deepspeed >= {need} (this is "
                f"{'.'.join(map(str, version))}: a CheckpointError in the backward pass): pip install 'lmrc[deepspeed]'"
                ", or set train.gradient_checkpointing: false"
            )


def _installed_version(package: str) -> tuple[int, ...] | None:
    """The release numbers of an installed package ((0, 19, 3) for "0.19.3+cu12"); None when not installed."""
    try:
        text = metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


@dataclass(frozen=True)
class Precision:
    """How the weights are loaded and what the Trainer autocasts to.

    Plain data parallel: the base weights in the resolved dtype, the LoRA weights in float32 (peft), no autocast,
    except float16, which needs autocast + a loss scaler (GPUs without native bf16). FSDP flattens the parameters
    of a wrapped module into one tensor of one dtype, so the base is loaded in float32 too and FSDP's mixed
    precision computes in bf16/fp16 (float32 master weights). DeepSpeed casts every parameter to its bf16/fp16.
    """

    load_dtype: Any
    bf16: bool
    fp16: bool

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for the autocast: what the Trainer's Accelerator must get, whatever the launcher said."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"


def resolve_precision(cfg: Stage2Config, device: Any, engine: str) -> Precision:
    """QLoRA: the 4-bit base computes in its compute dtype (the resolved dtype), the adapter is float32, and the
    Trainer autocasts to that dtype (bf16 where the GPU has it; fp16 with a loss scaler on older GPUs), as the
    QLoRA recipe trains; without autocast the float32 adapter would run the LoRA matmuls in float32."""
    dtype = resolve_dtype(cfg.dtype, device)
    half = dtype in (torch.bfloat16, torch.float16)
    cuda = device.type == "cuda"
    if cfg.load_in_4bit:
        return Precision(dtype, dtype == torch.bfloat16 and cuda, dtype == torch.float16 and cuda)
    if engine == "fsdp":
        return Precision(torch.float32, dtype == torch.bfloat16, dtype == torch.float16)
    if engine == "deepspeed":
        return Precision(dtype, dtype == torch.bfloat16, dtype == torch.float16)
    return Precision(dtype, False, half and dtype == torch.float16 and device.type == "cuda")


def apply_precision(cfg: Stage2Config, device: Any, engine: str) -> Precision:
    """`resolve_precision`, and the same autocast for the Trainer's Accelerator, which takes it from
    ACCELERATE_MIXED_PRECISION when TrainingArguments say neither bf16 nor fp16: a launcher's (or a node's
    default config's) fp16 would otherwise autocast over bf16 weights."""
    precision = resolve_precision(cfg, device, engine)
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision.mixed_precision
    return precision

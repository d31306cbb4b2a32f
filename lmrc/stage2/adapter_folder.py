"""The folders a stage-2 run leaves for `lmrc stage2 predict --adapter`: the finished adapter in `<output_dir>`
and the snapshots `<output_dir>/snapshots/tokens-<n>`.

Each holds the adapter weights (safetensors) and `adapter_config.json`, the tokenizer, the resolved config, the
prompt template and the relation set, which is all predict needs. `adapter_config.json` is written last: its
presence marks a finished adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import Trainer

from lmrc.config import save_config
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, atomic_write_text, move_files_into
from lmrc.stage2.adapter import ADAPTER_WEIGHTS
from lmrc.stage2.budget import StepPlan, steps_for_tokens, tokens_for_steps
from lmrc.stage2.config import Stage2Config
from lmrc.stage2.modeling import ADAPTER_CONFIG, CONFIG_FILE, RELATIONS_FILE, TEMPLATE_FILE
from lmrc.stage2.summary import SUMMARY_FILE
from lmrc.training.run_folder import publish

log = logging.getLogger(__name__)

SNAPSHOTS_DIR = "snapshots"  # <output_dir>/snapshots/tokens-<n>: the adapter at train.snapshot_tokens
_FINAL_TMP = ".final.tmp"  # the finished adapter's files before they are moved into <output_dir>


@dataclass(frozen=True)
class AdapterFiles:
    """What predict reads beside the adapter weights; the finished adapter and every snapshot get the same."""

    tokenizer: Any
    cfg: Stage2Config
    template_text: str
    relations: RelationSet

    def write(self, folder: Path, output_dir: Path | None = None) -> None:
        """Into `folder`; the saved config names `output_dir` (default: the run's own)."""
        cfg = self.cfg if output_dir is None else dataclasses.replace(self.cfg, output_dir=str(output_dir))
        self.tokenizer.save_pretrained(str(folder))
        atomic_write_text(folder / TEMPLATE_FILE, self.template_text)
        names = {rid: self.relations.name(rid) for rid in self.relations.ids}
        atomic_write_json(folder / RELATIONS_FILE, names, indent=1)
        save_config(cfg, folder / CONFIG_FILE)


def _copy_adapter_weights(checkpoint: Path, folder: Path) -> None:
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copy2(checkpoint / name, folder / name)


def _remove(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)


def save_final_adapter(trainer: Trainer, out: Path, files: AdapterFiles) -> None:
    """The adapter folder. Every rank takes part in the Trainer's save (it gathers the adapter from the shards
    under FSDP / ZeRO-3); rank 0 writes it to a temporary folder first, then moves the files in."""
    main = trainer.accelerator.is_main_process
    tmp = out / _FINAL_TMP
    if main:
        _remove(tmp)
    trainer.accelerator.wait_for_everyone()
    # gather the adapter on rank 0, whatever state-dict type the checkpoints use
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if not main:
        return
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the resolved config says it all
    files.write(tmp)
    move_files_into(tmp, out, last=ADAPTER_CONFIG)


def adapter_from_checkpoint(checkpoint: Path, out: Path, files: AdapterFiles) -> None:
    """The adapter folder of a run whose last step was saved in `checkpoint` but which was killed before the
    folder was written: a copy of the saved adapter (the Trainer's checkpoint holds it whole, gathered from the
    shards).

    Copied, not saved through the Trainer: under DeepSpeed `save_model` needs the engine-wrapped model, which
    exists only once training starts, and a finished run has nothing to train."""
    if not (checkpoint / ADAPTER_WEIGHTS).is_file() or not (checkpoint / ADAPTER_CONFIG).is_file():
        raise LmrcError(
            f"{checkpoint}: the finished run's checkpoint holds no whole adapter ({ADAPTER_WEIGHTS}, "
            f"{ADAPTER_CONFIG}) to write {out} from (a sharded state dict?); train again in another --output-dir"
        )
    tmp = out / _FINAL_TMP
    _remove(tmp)
    tmp.mkdir(parents=True)
    _copy_adapter_weights(checkpoint, tmp)
    files.write(tmp)
    move_files_into(tmp, out, last=ADAPTER_CONFIG)
    log.info("%s: adapter written from %s", out, checkpoint)


def snapshot_writers(
    files: AdapterFiles, lengths: Sequence[int], world: int, plan: StepPlan, start_step: int
) -> dict[int, Callable[[Path], None]]:
    """For each `train.snapshot_tokens` count the run reaches before its last step: the optimizer step at which
    it is reached (the rule of `train.max_tokens`) and a function that writes the adapter folder
    `snapshots/tokens-<n>` from that step's Trainer checkpoint. A snapshot is the adapter part-way through one
    learning-rate schedule, not an adapter trained to that budget with its own schedule (which decays to 0)."""
    cfg = files.cfg
    writers: dict[int, Callable[[Path], None]] = {}
    for budget in sorted(cfg.train.snapshot_tokens):
        step = steps_for_tokens(lengths, cfg, world, budget)
        dest = Path(cfg.output_dir) / SNAPSHOTS_DIR / f"tokens-{budget}"
        if step >= plan.total_steps:
            log.warning(
                "train.snapshot_tokens %d: the run ends at that step; the finished adapter is it", budget
            )
            continue
        if step <= start_step:
            if not (dest / ADAPTER_CONFIG).is_file():
                log.warning(
                    "%s: its step %d was trained before this resume without it; not written", dest, step
                )
            continue
        meta = {
            "finished": True,
            "snapshot_of": cfg.output_dir,
            "budget_tokens": budget,
            "steps": step,
            "total_steps": plan.total_steps,
            "tokens_trained": tokens_for_steps(lengths, cfg, world, step),
        }
        writers[step] = _snapshot_writer(files, dest, meta)
    return writers


def _snapshot_writer(files: AdapterFiles, dest: Path, meta: dict) -> Callable[[Path], None]:
    def fill(folder: Path, checkpoint: Path) -> None:
        _copy_adapter_weights(checkpoint, folder)
        files.write(folder, output_dir=dest)
        atomic_write_json(folder / SUMMARY_FILE, meta, indent=2)

    def write(checkpoint: Path) -> None:
        if not (checkpoint / ADAPTER_WEIGHTS).is_file():  # a sharded state dict (FSDP): no whole adapter
            log.warning("%s: no %s in %s; snapshot not written", dest, ADAPTER_WEIGHTS, checkpoint)
            return
        publish(dest, lambda folder: fill(folder, checkpoint))
        log.info("snapshot at step %d (%d tokens trained): %s", meta["steps"], meta["tokens_trained"], dest)

    return write

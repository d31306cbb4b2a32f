"""Run by tests/test_multirank.py under `torchrun --nproc_per_node 2` (gloo on CPU): one training call per launch.

    python -m torch.distributed.run --nproc_per_node 2 tests/multirank_driver.py SPEC.json

SPEC: {"stage": 1 | 2, "overrides": [...], "output_dir": ..., "resume": bool, "stop_after_steps": int | null,
"signal_rank": int | null, "signal_at_step": int | null, "result": "path prefix"}. Every rank writes
`<result>.<rank>.json`: its step losses, the sequences (fingerprints) of each of its micro-batches per step, and
how the call ended. The call runs inside `log_to_file(<output_dir>/train.log)`, as the CLI runs it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    out = Path(spec["output_dir"])
    seen: dict[int, list] = {}
    record: dict = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1"))}
    from lmrc.commands.common import log_to_file

    logging.getLogger().setLevel(logging.INFO)  # as the CLI sets it: train.log gets the INFO lines

    with log_to_file(out / "train.log"):
        try:
            if spec["stage"] == 1:
                record.update(_stage1(spec, out, seen))
            else:
                record.update(_stage2(spec, out, seen))
            record["ended"] = "returned"
        except KeyboardInterrupt:
            record["ended"] = "interrupted"
            state = out / "last" / ("trainer_state.json" if spec["stage"] == 1 else "state.json")
            saved = json.loads(state.read_text()) if state.is_file() else None
            record["saved_step"] = None if saved is None else saved.get("step", saved.get("global_step"))
    record["batches"] = {str(k): v for k, v in seen.items()}
    Path(f"{spec['result']}.{rank}.json").write_text(json.dumps(record))


def _fingerprint(ids: list[int]) -> list[int]:
    """A sequence's length and a position-weighted checksum (prompts share long prefixes)."""
    return [len(ids), sum((k + 1) * t for k, t in enumerate(ids)) % (2**61 - 1)]


def _stage1(spec: dict, out: Path, seen: dict) -> dict:
    from lmrc.stage1 import train as train_mod
    from lmrc.stage1.config import load_stage1_config

    original = train_mod.Stage1Recipe._micro_step
    rank = int(os.environ.get("RANK", "0"))
    signalled = []

    def recording(self, inputs, num, den):
        step = self.pos.global_step + 1
        if num:  # a zero-weighted filler batch trains nothing
            seen.setdefault(step, []).extend(_fingerprint(ids) for ids in inputs["input_ids"].tolist())
        if rank == spec.get("signal_rank") and step == spec.get("signal_at_step") and not signalled:
            signalled.append(step)
            os.kill(os.getpid(), signal.SIGTERM)  # only this rank is told to stop, in the middle of a step
        return original(self, inputs, num, den)

    train_mod.Stage1Recipe._micro_step = recording
    cfg = load_stage1_config(None, [*spec["overrides"], f"output_dir={out}"])
    result = train_mod.train(
        cfg, resume=spec.get("resume", False), stop_after_steps=spec.get("stop_after_steps")
    )
    return {"losses": [loss for _, loss in result.step_losses], "steps": result.global_step}


def _stage2(spec: dict, out: Path, seen: dict) -> dict:
    from lmrc.stage2 import train as train_mod
    from lmrc.stage2.config import load_stage2_config

    class Recording(train_mod.AnswerLossTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            step = int(self.state.global_step) + 1
            ids = inputs["input_ids"].tolist()
            seen.setdefault(step, []).extend(_fingerprint(row) for row in ids)
            return super().compute_loss(model, inputs, *a, **kw)

    train_mod.AnswerLossTrainer = Recording
    rank = int(os.environ.get("RANK", "0"))

    def on_step(record):
        if rank == spec.get("signal_rank") and record["step"] == spec.get("signal_at_step"):
            os.kill(os.getpid(), signal.SIGTERM)  # only this rank is told to stop

    cfg = load_stage2_config(None, spec["overrides"])
    result = train_mod.train(
        cfg,
        out,
        resume=spec.get("resume", False),
        on_step=on_step,
        stop_after_steps=spec.get("stop_after_steps"),
    )
    return {"losses": result.losses, "steps": result.steps}


if __name__ == "__main__":
    main()

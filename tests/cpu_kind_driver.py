"""Run by tests/test_cpu_kinds.py in a child process under one CPU ISA level (set through the environment):
a short stage-1 training, a LoRA step and constrained generation, through lmrc's CLI with precision "auto", as a
user's first run does. Prints "step <name>" before each step and "ok <name> <precision>" after it, so that the
parent can name the step a crash happened in.

Usage: python tests/cpu_kind_driver.py WORKDIR MODELS_DIR DATA_DIR
(MODELS_DIR holds `tiny-bert/` and `tiny-llama/`, built once by the test; DATA_DIR is the real data folder.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _flags(settings: list[str]) -> list[str]:
    return [x for s in settings for x in ("--set", s)]


def _step(name: str) -> None:
    print(f"step {name}", flush=True)


def main(work: Path, models: Path, data: Path) -> int:
    import torch

    torch.set_num_threads(1)
    from lmrc.cli import main as lmrc
    from lmrc.machine.hardware import resolve_mixed_precision
    from lmrc.stage2.modeling import resolve_dtype

    rel_info = data / "redocred" / "rel_info.json"
    docs = json.loads((data / "redocred" / "dev_50.json").read_text(encoding="utf-8"))
    docs = sorted((d for d in docs if d["labels"]), key=lambda d: sum(len(s) for s in d["sents"]))[:3]
    train = work / "docs.json"
    train.write_text(json.dumps(docs), encoding="utf-8")

    _step("stage1-train")
    # emb 768 x block 64: the real bilinear's 49,152 inputs, whose bf16 tails crash oneDNN's AMX kernel
    sets = [
        f"model.encoder={models / 'tiny-bert'}",
        "model.emb_size=768",
        "model.block_size=64",
        f"data.train={train}",
        "data.tune=null",
        f"data.rel_info={rel_info}",
        "train.epochs=1",
        "train.batch_size=2",
        "train.log_every_steps=0",
        "train.mixed_precision=auto",
    ]
    assert lmrc(["-q", "stage1", "train", *_flags(sets), "--output-dir", str(work / "stage1")]) == 0
    print(f"ok stage1-train {resolve_mixed_precision('auto', cuda=False)}", flush=True)

    _step("lora-step")
    sets = [
        f"model={models / 'tiny-llama'}",
        f"data.train={train}",
        f"data.rel_info={rel_info}",
        "data.max_docs=1",
        "max_seq_len=1024",
        "dtype=auto",
        "train.max_steps=1",
        "train.warmup_steps=0",
    ]
    assert lmrc(["-q", "stage2", "train", *_flags(sets), "--output-dir", str(work / "adapter")]) == 0
    print(f"ok lora-step {resolve_dtype('auto', torch.device('cpu'))}", flush=True)

    _step("constrained-generation")
    out = work / "result.json"
    code = lmrc(
        ["-q", "stage2", "predict", "--adapter", str(work / "adapter"), "--input", str(train), "--gold-pairs",
         "--output", str(out), "--set", "generation.constrained=true", "--set", "generation.max_new_tokens_cap=24"]
    )  # fmt: skip
    assert code == 0 and isinstance(json.loads(out.read_text(encoding="utf-8")), list)
    print("ok constrained-generation", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))

"""Two real ranks on a CPU (`torchrun --nproc_per_node 2`, gloo) for stage-1 and stage-2 training.

What one GPU per rank would run, on tiny random models: the data is sharded over the ranks (each optimizer step
sees the global batch once), two ranks with `grad_accum` k take the same steps over the same documents as one
rank with `grad_accum` 2k and reach the same losses (to float rounding), files are written once (rank 0), and a
run stopped by SIGTERM to one of two ranks saves the step under way on both and continues with `--resume` on
two ranks to the losses of the uninterrupted run. Each launch is a separate process group (tests/multirank_driver.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from stage1_run_helpers import save_tiny_bert, shortest, write_docs
from stage2_helpers import tiny_model_dir

from lmrc.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("multirank_driver.py")


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch(tmp: Path, name: str, ranks: int, **spec) -> list[dict]:
    """Run the driver on `ranks` processes; each rank's result record."""
    spec = {"result": str(tmp / name), **spec}
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    if ranks == 1:
        cmd = [sys.executable, str(DRIVER), str(spec_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
        cmd += [str(DRIVER), str(spec_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads((tmp / f"{name}.{r}.json").read_text()) for r in range(ranks)]


def per_step(records: list[dict]) -> dict[str, list]:
    """Step -> the sequences (fingerprints) trained on in that step, over all ranks, sorted."""
    merged: dict[str, list] = {}
    for rec in records:
        for step, rows in rec["batches"].items():
            merged.setdefault(step, []).extend(rows)
    return {k: sorted(v) for k, v in merged.items()}


def log_lines(path: Path, needle: str) -> list[str]:
    return [line for line in path.read_text().splitlines() if needle in line]


# ----------------------------------------------------------------------------------------------------- stage 1


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory, dev_docs, redocred_dir):
    tmp = tmp_path_factory.mktemp("multirank1")
    docs = shortest(dev_docs, 7)
    base = [
        f"model.encoder={save_tiny_bert(tmp / 'tiny', dropout=0.0)}",
        "model.emb_size=64",
        "model.block_size=16",
        f"data.train={write_docs(tmp / 'train.json', docs[:5])}",
        f"data.tune={write_docs(tmp / 'tune.json', docs[5:7])}",
        f"data.rel_info={redocred_dir / 'rel_info.json'}",
        "train.epochs=2",
        "train.batch_size=1",
        "train.lr_encoder=1e-3",
        "train.lr_head=1e-3",
        "train.log_every_steps=1",
        "train.mixed_precision=no",
        "train.save_every_steps=0",
        f"data.cache_dir={tmp / 'cache'}",
    ]
    one = launch(tmp, "one", 1, stage=1, overrides=[*base, "train.grad_accum=2"], output_dir=str(tmp / "one"))
    two = launch(tmp, "two", 2, stage=1, overrides=[*base, "train.grad_accum=1"], output_dir=str(tmp / "two"))
    killed = launch(
        tmp, "killed", 2, stage=1, overrides=[*base, "train.grad_accum=1"], output_dir=str(tmp / "cont"),
        signal_rank=1, signal_at_step=2,
    )  # fmt: skip
    resumed = launch(
        tmp, "resumed", 2, stage=1, overrides=[*base, "train.grad_accum=1"], output_dir=str(tmp / "cont"),
        resume=True,
    )  # fmt: skip
    return tmp, one, two, killed, resumed


def test_stage1_two_ranks_take_the_steps_of_one_rank_with_the_global_batch(stage1_runs):
    _, one, two, _, _ = stage1_runs
    # 5 documents, batch 1: 3 steps per epoch on one rank with grad_accum 2 and on two ranks with grad_accum 1.
    assert one[0]["steps"] == two[0]["steps"] == two[1]["steps"] == 6
    steps_one, steps_two = per_step(one), per_step(two)
    assert steps_two == steps_one  # the same documents in every step, each once
    for step in steps_two:  # sharded: the ranks' documents of a step do not overlap
        a, b = (sorted(r["batches"].get(step, [])) for r in two)
        assert not set(map(tuple, a)) & set(map(tuple, b)), step
    assert two[0]["losses"] == two[1]["losses"]  # every rank reports the global step loss
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-4, abs=1e-6)


def test_stage1_sigterm_to_one_rank_saves_on_both_and_resumes_on_two_ranks(stage1_runs):
    tmp, _, two, killed, resumed = stage1_runs
    # SIGTERM to rank 1 during step 2: both ranks finish the step, save it, and stop (no deadlock)
    assert [r["ended"] for r in killed] == ["interrupted", "interrupted"]
    assert killed[0]["saved_step"] == 2
    assert resumed[0]["steps"] == 6
    assert resumed[0]["losses"] == pytest.approx(two[0]["losses"][2:], rel=1e-5, abs=1e-7)
    for run in ("two", "cont"):
        out = tmp / run
        assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [3, 6]  # one line per evaluation
        assert (out / "best" / "model.safetensors").is_file() and (
            out / "last" / "model.safetensors"
        ).is_file()
        # every logged step once in train.log (rank 0 writes it)
        lines = log_lines(out / "train.log", " step 1/6 ")
        assert len(lines) == 1, lines
    assert len(log_lines(tmp / "cont" / "train.log", " step 3/6 ")) == 1  # resumed after step 2: logged once


# ----------------------------------------------------------------------------------------------------- stage 2


@pytest.fixture(scope="module")
def stage2_runs(tmp_path_factory, redocred_dir):
    tmp = tmp_path_factory.mktemp("multirank2")
    base = [
        f"model={tiny_model_dir()}",
        f"data.train={redocred_dir / 'dev_50.json'}",
        f"data.rel_info={redocred_dir / 'rel_info.json'}",
        "data.max_docs=2",
        "max_seq_len=1024",
        "dtype=float32",
        "train.batch_size=1",
        "train.warmup_steps=0",
        "train.lr=0.05",
        "train.max_steps=4",
        "train.epochs=4",
        "train.log_every_steps=1",
        "train.save_every_steps=0",
        "lora.dropout=0.0",
    ]
    one = launch(tmp, "one", 1, stage=2, overrides=[*base, "train.grad_accum=2"], output_dir=str(tmp / "one"))
    two = launch(tmp, "two", 2, stage=2, overrides=[*base, "train.grad_accum=1"], output_dir=str(tmp / "two"))
    killed = launch(
        tmp, "killed", 2, stage=2, overrides=[*base, "train.grad_accum=1"], output_dir=str(tmp / "cont"),
        signal_rank=1, signal_at_step=2,
    )  # fmt: skip
    resume = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    resume += ["-m", "lmrc", "stage2", "train", "--resume", "--output-dir", str(tmp / "cont")]
    proc = subprocess.run(resume, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, one, two, killed, proc.stdout


def test_stage2_two_ranks_take_the_steps_of_one_rank_with_the_global_batch(stage2_runs):
    tmp, one, two, _, _ = stage2_runs
    assert one[0]["steps"] == two[0]["steps"] == two[1]["steps"] == 4
    steps_one, steps_two = per_step(one), per_step(two)
    assert steps_two == steps_one and len(steps_two) == 4
    for step in steps_two:
        a, b = (r["batches"][step] for r in two)
        assert len(a) == len(b) == 1 and a != b, step  # one sequence per rank, not the same one
    assert two[0]["losses"] == two[1]["losses"]
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-4, abs=1e-6)
    summary = json.loads((tmp / "two" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert [r["step"] for r in read_jsonl(tmp / "two" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert len(log_lines(tmp / "two" / "train.log", "step 3/4 ")) == 1
    assert (tmp / "two" / "adapter_model.safetensors").is_file()
    assert not list((tmp / "two").glob("checkpoint-*"))


def test_stage2_sigterm_to_one_rank_saves_on_all_and_resumes_on_two_ranks(stage2_runs):
    tmp, _, two, killed, stdout = stage2_runs
    assert [r["ended"] for r in killed] == ["interrupted", "interrupted"]  # no deadlock: both stopped
    cont = tmp / "cont"
    assert killed[0]["saved_step"] == 2  # the step under way when rank 1 got SIGTERM, saved for both
    assert "training finished: step 4 of 4" in stdout
    assert (cont / "last" / "rng_state_0.pth").is_file() and (cont / "last" / "rng_state_1.pth").is_file()
    logged = read_jsonl(cont / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["loss"] for r in logged] == pytest.approx(two[0]["losses"], rel=1e-5, abs=1e-7)
    assert (cont / "adapter_model.safetensors").is_file() and (cont / "adapter_config.json").is_file()
    assert len(log_lines(cont / "train.log", "step 4/4 ")) == 1

"""The CPU-kind matrix: a user's first steps (short stage-1 training, a LoRA step, constrained generation) under
every CPU ISA level this machine can imitate, each in a child process, with precision "auto" and lmrc's CPU guard as
a user gets them. A crash (SIGFPE in oneDNN's AMX kernel was the first) fails the test with the level and the step
named.

Levels: the machine as it is; AMX off (`ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`) on an AMX CPU; AVX512 without
bf16 (`AVX512_CORE`) on a CPU with AVX512-BF16; AVX2 (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`) on an
AVX512 CPU.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from stage1_run_helpers import save_tiny_bert
from stage2_helpers import tiny_model_dir

from lmrc.machine.cpu_info import ISA_ENV, imitable_levels, level_environment, read_cpu

DRIVER = Path(__file__).with_name("cpu_kind_driver.py")


def levels() -> list[tuple[str, dict[str, str]]]:
    cpu = read_cpu()
    cap = {k: v for k, v in os.environ.items() if k in ISA_ENV}
    return imitable_levels(cpu) if not cap else [("as set", cap)]  # a run that imitates a kind itself


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cpu-kind-models")
    save_tiny_bert(root / "tiny-bert")
    shutil.copytree(tiny_model_dir(), root / "tiny-llama")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("level, env", levels(), ids=[name for name, _ in levels()])
def test_first_steps_run_under_every_cpu_kind_this_machine_can_imitate(
    level, env, models, data_dir, tmp_path, cache_dir
):
    child_env = level_environment(env)  # from the real CPU up
    child_env.update(LMRC_CACHE=str(cache_dir), OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    child_env["PYTHONPATH"] = os.pathsep.join([str(DRIVER.parent), child_env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(tmp_path), str(models), str(data_dir)],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    steps = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("step ")]
    at = steps[-1] if steps else "start-up"
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        pytest.fail(f"CPU kind {level} ({env or 'as is'}): crashed by {name} in {at}\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, f"CPU kind {level} ({env or 'as is'}): failed in {at}\n{proc.stderr[-3000:]}"
    done = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert done == ["stage1-train", "lora-step", "constrained-generation"]
    if level in (
        "avx2",
        "avx512-no-bf16",
    ):  # no native bf16 there: float32 by default (bf16 is emulated, slow)
        assert "ok stage1-train no" in proc.stdout and "ok lora-step torch.float32" in proc.stdout

"""The GPU scripts dry-run here (DRY_RUN=1): every command they would run parses, and every config resolves."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from lmrc.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def _dry_run(*args: str, **env: str) -> list[list[str]]:
    out = subprocess.run(
        ["bash", *args],
        cwd=REPO,
        env={
            **os.environ,
            "DRY_RUN": "1",
            "NUM_GPUS": "8",
            "LMRC_DATA_DIR": "/data",
            "BACKEND": "vllm",
            "MIXED_PRECISION": "bf16",  # what lmrc resolves on a native-bf16 GPU (computed: see the test below)
            **env,
        },
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = [
        shlex.split(line[len("DRY_RUN:") :]) for line in out.splitlines() if line.startswith("DRY_RUN:")
    ]
    assert commands, out
    return commands


def _lmrc_args(cmd: list[str]) -> list[str]:
    i = cmd.index("-m", cmd.index("-m") + 1) if "accelerate.commands.launch" in cmd else cmd.index("-m")
    assert cmd[i + 1] == "lmrc"
    return cmd[i + 2 :]


def _resolve(args: list[str]) -> str:
    """Parse the lmrc command line and load the config it names, as lmrc would."""
    ns = build_parser().parse_args(args)
    if args[:2] == ["stage1", "train"]:
        from lmrc.stage1.config import load_stage1_config

        cfg = load_stage1_config(ns.config, ns.overrides)
        return f"stage1 {cfg.model.encoder} {cfg.train.epochs}"
    if args[:2] == ["stage2", "train"]:
        from lmrc.stage2.config import load_stage2_config

        cfg = load_stage2_config(ns.config, ns.overrides)
        return f"stage2 {cfg.mode} {cfg.model} {cfg.train.epochs} {cfg.train.warmup_steps}"
    if args[0] == "predict":
        from lmrc.commands.predict import _predict_config

        cfg = _predict_config(ns)
        return f"predict {cfg.stage2.overrides}"
    if args[0] == "compare":
        from lmrc.experiments.compare import load_compare_config

        return f"compare {load_compare_config(ns.config, ns.overrides).rc.path}"
    return args[0]


def test_run_redocred_trains_both_stages_with_the_papers_settings_then_predicts_and_compares():
    commands = _dry_run("scripts/run_redocred.sh", "runs/x")
    resolved = [_resolve(_lmrc_args(c)) for c in commands]
    assert resolved[:3] == [
        "stage1 roberta-large 30",
        "stage2 rc meta-llama/Llama-2-13b-chat-hf 8 100",
        "stage2 direct meta-llama/Llama-2-13b-chat-hf 2 200",
    ]
    for c in commands[:3]:
        assert c[c.index("--num_processes") + 1] == "8"
    assert resolved[3:5] == ["predict {'generation': {'backend': 'vllm'}}"] * 2
    assert resolved[5:] == ["evaluate", "compare runs/x/rc"]


def test_run_redocred_runs_one_shard_of_the_predictions():
    commands = _dry_run("scripts/run_redocred.sh", "runs/x", PREDICT_SHARD="3/8")
    predicts = [c for c in commands if "predict" in c]
    assert len(predicts) == 2 and len(commands) == 5  # no evaluate / compare before the shards are merged
    for c in predicts:
        assert c[c.index("--shard") + 1] == "3/8" and c[c.index("--output") + 1].endswith(".shard3.json")


@pytest.mark.parametrize("mode", ["rc", "direct"])
def test_train_stage2_uses_the_accelerate_config_and_the_mode(mode):
    (cmd,) = _dry_run("scripts/train_stage2.sh", mode, "--set", "train.epochs=1",
                      ACCELERATE_CONFIG="configs/accelerate/fsdp.yaml")  # fmt: skip
    assert cmd[cmd.index("--config_file") + 1] == "configs/accelerate/fsdp.yaml"
    assert _resolve(_lmrc_args(cmd)).startswith(f"stage2 {mode} ")
    assert _lmrc_args(cmd)[-2:] == ["--set", "train.epochs=1"]


def test_train_stage1_and_bad_mode():
    (cmd,) = _dry_run("scripts/train_stage1.sh")
    assert _resolve(_lmrc_args(cmd)) == "stage1 roberta-large 30"
    bad = subprocess.run(
        ["bash", "scripts/train_stage2.sh", "both"], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "mode must be rc or direct" in bad.stderr


def test_every_shipped_config_resolves():
    import yaml

    from lmrc.config import load_config
    from lmrc.entities.config import EntitiesConfig
    from lmrc.experiments.compare import load_compare_config
    from lmrc.stage1.config import load_stage1_config
    from lmrc.stage2.config import load_stage2_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if path.name.startswith("entities_"):
            load_config(EntitiesConfig, path)
        elif "eval" in raw:
            load_compare_config(path)
        elif "mode" in raw:
            load_stage2_config(path)
        else:
            load_stage1_config(path)


def test_training_without_an_accelerate_config_asks_for_every_gpu_explicitly():
    """A node's default accelerate config could run one process: --multi_gpu and --num_processes override it."""
    commands = _dry_run("scripts/run_redocred.sh", "runs/x")
    for c in commands[:3]:
        assert "--multi_gpu" in c and c[c.index("--num_processes") + 1] == "8"
        assert "--config_file" not in c
    (one,) = _dry_run("scripts/train_stage1.sh", NUM_GPUS="1")
    # one GPU: a plain process, so that a node's default accelerate config cannot pick FSDP / DeepSpeed for it
    assert "accelerate.commands.launch" not in one and one[1:3] == ["-m", "lmrc"]
    (fsdp,) = _dry_run("scripts/train_stage2.sh", "rc", ACCELERATE_CONFIG="configs/accelerate/fsdp.yaml")
    assert "--multi_gpu" not in fsdp  # the config file names the engine


def test_prediction_shards_run_on_distinct_gpus_unless_the_job_chose_one():
    gpus = set()
    for i in range(8):
        commands = _dry_run("scripts/run_redocred.sh", "runs/x", PREDICT_SHARD=f"{i}/8")
        predicts = [c for c in commands if "predict" in c]
        assert {c[0] for c in predicts} == {"env"}
        gpus |= {c[1] for c in predicts}
    assert gpus == {f"CUDA_VISIBLE_DEVICES={i}" for i in range(8)}
    commands = _dry_run("scripts/run_redocred.sh", "runs/x", PREDICT_SHARD="3/8", CUDA_VISIBLE_DEVICES="5")
    assert all(c[0] != "env" for c in commands)  # a SLURM job's own GPU is kept


def test_scripts_expand_no_possibly_empty_array_under_set_u():
    """bash < 4.4 (macOS, older clusters) treats "${a[@]}" of an empty array as unset under `set -u`."""
    import re

    for path in sorted((REPO / "scripts").glob("*.sh")):
        text = "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
        for m in re.finditer(r'"\$\{(\w+)\[@\]\}"', text):
            name = m.group(1)
            guarded = text[max(0, m.start() - len(name) - 8) : m.start()].endswith(f"${{{name}[@]+")
            never_empty = name in ("cmd", "RUNS_A", "RUNS_B", "LIST")  # filled by the script itself
            assert guarded or never_empty, f'{path.name}: unguarded "${{{name}[@]}}"'


def test_run_redocred_runs_under_bash_set_u_without_shards():
    commands = _dry_run("scripts/run_redocred.sh", "runs/x")
    assert all("--shard" not in c for c in commands)


def test_accelerate_configs_leave_batch_settings_to_the_trainer_and_gather_on_save():
    import yaml

    ds = yaml.safe_load((REPO / "configs/accelerate/deepspeed_zero3.yaml").read_text())["deepspeed_config"]
    assert ds["zero_stage"] == 3 and ds["zero3_save_16bit_model"] is True
    # a hard-coded accumulation or clipping would contradict train.grad_accum / max_grad_norm
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
    fsdp = yaml.safe_load((REPO / "configs/accelerate/fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and fsdp["fsdp_use_orig_params"] is True
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp  # any model's own decoder layer


def test_gpu_check_without_cuda_prints_one_line_and_skips_everything(tmp_path):
    import json
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: make gpu-check runs for real")
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == ["gpu-check: no CUDA device: every check skipped"]
    report = json.loads(out.read_text())
    names = [c["name"] for c in report["checks"]]
    assert len(names) == 11 and "vllm-lora-structured" in names and {"zero3", "fsdp"} <= set(names)
    assert {(c["status"], c["detail"]) for c in report["checks"]} == {("skipped", "no CUDA device")}
    assert report["machine"]["cuda"] is None
    make = (REPO / "Makefile").read_text()
    assert "gpu-check:" in make and "scripts/gpu_check.py" in make


# ------------------------------------------------------------------------------ GPU launch path (issue 26)


def test_stage1_never_gets_the_fsdp_or_deepspeed_config_but_stage2_does():
    """ZeRO-3 / FSDP break stage 1 (prepare without a dataloader, one FSDP unit): it always runs DDP."""
    for config in ("configs/accelerate/fsdp.yaml", "configs/accelerate/deepspeed_zero3.yaml"):
        commands = _dry_run("scripts/run_redocred.sh", "runs/x", ACCELERATE_CONFIG=config)
        stage1, rc, direct = commands[:3]
        assert _lmrc_args(stage1)[:2] == ["stage1", "train"]
        assert "--config_file" not in stage1 and "--multi_gpu" in stage1
        for c in (rc, direct):
            assert c[c.index("--config_file") + 1] == config and "--multi_gpu" not in c
    (alone,) = _dry_run("scripts/train_stage1.sh", ACCELERATE_CONFIG="configs/accelerate/fsdp.yaml")
    assert "--config_file" not in alone and "--multi_gpu" in alone


def test_training_is_launched_with_the_precision_lmrc_resolves():
    """A node's accelerate default of fp16 would autocast fp16 over bf16 weights: --mixed_precision is explicit."""
    from lmrc.machine.hardware import resolve_mixed_precision

    for c in _dry_run("scripts/run_redocred.sh", "runs/x", MIXED_PRECISION="fp16")[:3]:
        assert c[c.index("--mixed_precision") + 1] == "fp16"
    (computed,) = _dry_run("scripts/train_stage2.sh", "rc", MIXED_PRECISION="")
    assert computed[computed.index("--mixed_precision") + 1] == resolve_mixed_precision("auto")


@pytest.mark.parametrize(
    ("visible", "gpus"), [(None, 4), ("1,3", 2), ("2", 1), ("", 1), ("0,1,2,3,4,5,6,7", 4), ("0,-1,2", 1)]
)
def test_gpus_are_counted_as_cuda_sees_them(tmp_path, visible, gpus):
    """nvidia-smi lists every GPU of the node; CUDA_VISIBLE_DEVICES (a SLURM job's share) hides the others."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n" + "".join(f'echo "GPU {i}: NVIDIA H100 (UUID: GPU-{i})"\n' for i in range(4))
    )
    fake.chmod(0o755)
    env = {"NUM_GPUS": "", "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    (cmd,) = _dry_run("scripts/train_stage2.sh", "rc", **env)
    assert cmd[cmd.index("--num_processes") + 1] == str(gpus)
    assert ("--multi_gpu" in cmd) == (gpus > 1)


def test_gpu_check_builds_its_tiny_models_without_the_model_wheels(tmp_path, redocred_dir, monkeypatch):
    """make gpu-check needs no packaged tokenizer: WordPiece and byte-level BPE tokenizers trained in code, which
    lmrc's stage-1 feature builder and stage-2 loader accept, and which encode any text (relation names too)."""
    import importlib.util
    import json

    from lmrc.stage1.encoder import load_encoder
    from lmrc.stage2.modeling import load_tokenizer

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setenv("LMRC_DATA_DIR", str(redocred_dir.parent))
    bert_dir = gpu_check._tiny_bert(tmp_path)
    llama_dir = gpu_check._tiny_llama(tmp_path)
    encoder, tokenizer = load_encoder(str(bert_dir))
    ids = tokenizer("Lothair II was born in 835 .", "x")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 2
    assert tokenizer.unk_token_id not in tokenizer("* Lothair", add_special_tokens=False)["input_ids"]
    assert encoder.config.vocab_size == len(tokenizer)
    tok = load_tokenizer(llama_dir)
    names = json.loads((redocred_dir / "rel_info.json").read_text()).values()
    for text in [*names, "ünïcode — 北京 (x|y)"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id


def test_gpu_check_kills_a_timed_out_checks_whole_process_group(tmp_path):
    """vLLM's engine processes outlive a killed parent and keep GPU memory: the whole group goes."""
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    pidfile = tmp_path / "grandchild.pid"
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    start = time.monotonic()
    rc, _, err = gpu_check.run_group(["bash", "-c", script], timeout=2)
    assert rc is None and "timed out" in err and time.monotonic() - start < 30
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the grandchild {grandchild} survived the timeout")
    assert gpu_check.run_group(["bash", "-c", "echo ok"], timeout=30)[:2] == (0, "ok\n")


def test_gpu_check_stage2_check_asserts_checkpointing_and_accumulation_on_the_trained_model(
    tmp_path, redocred_dir
):
    """The check inspects the prepared model (a Trainer callback), in its own process, as on a GPU."""
    import json
    import sys

    out = tmp_path / "report.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "LMRC_DATA_DIR": str(redocred_dir.parent),
    }
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--allow-cpu", "--only", "stage2-lora-resume", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    (check,) = json.loads(out.read_text())["checks"]
    assert check["status"] == "pass", (check, proc.stderr[-2000:])
    assert "checkpointing on, grad_accum 2" in check["detail"]
    probe = json.loads((tmp_path / "work" / "stage2-adapter.probe.json").read_text())
    assert probe["checkpointing"] is True and probe["grad_accum"] == 2
    assert probe["zero3_params"] == probe["fsdp_units"] == 0  # one plain process: nothing sharded


def test_demo_data_finds_the_shared_data_beside_the_checkout_without_lmrc_data_dir(tmp_path):
    """README's `export LMRC_DATA_DIR=$(bash scripts/demo_data.sh)` on a machine whose data sits in ../shared."""
    checkout = tmp_path / "lmrc"
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "scripts" / "demo_data.sh").write_text((REPO / "scripts" / "demo_data.sh").read_text())
    shared = tmp_path / "shared" / "data" / "redocred"
    shared.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "LMRC_DATA_DIR"}
    script = checkout / "scripts" / "demo_data.sh"
    with pytest.raises(
        subprocess.CalledProcessError
    ):  # no split there yet, no internet: the fetch path fails
        subprocess.run(
            ["bash", str(script)],
            env={**env, "LMRC": "false", "LMRC_CACHE": str(tmp_path / "cache")},
            capture_output=True,
            check=True,
        )
    (shared / "dev_50.json").write_text("[]")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "shared" / "data")
    given = subprocess.run(
        ["bash", str(script)], env={**env, "LMRC_DATA_DIR": str(tmp_path / "shared" / "data")}, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    assert given.stdout.strip() == str(tmp_path / "shared" / "data")

"""The GPU launch path, tested on a CPU (issue 26): what each engine may train, the process group's timeout, the
precision the Trainer autocasts to whatever the launcher said, QLoRA's precision, and the vLLM engine's settings
(a fake vllm records them). No GPU has run these; what needs one is listed in docs/GPUS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmrc.errors import LmrcError
from lmrc.stage2.config import load_stage2_config

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- engines (items 1, 2, 7)


@pytest.mark.parametrize("var", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_stage1_refuses_fsdp_and_deepspeed_in_one_line(monkeypatch, tmp_path, var):
    from lmrc.stage1.config import load_stage1_config
    from lmrc.stage1.train import train

    monkeypatch.setenv(var, "true")
    cfg = load_stage1_config(
        None, [f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'missing.json'}"]
    )
    with pytest.raises(LmrcError) as err:  # before the data (missing here) or the encoder is touched
        train(cfg)
    message = str(err.value)
    assert "stage 1 trains with DDP only" in message and var in message and "\n" not in message
    monkeypatch.setenv(var, "false")
    with pytest.raises(LmrcError) as err:
        train(cfg)
    assert "DDP only" not in str(err.value)  # DDP / one process: on to the data, which is missing


def _stage2_cfg(*extra: str):
    return load_stage2_config(None, ["model=some/model", *extra])


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_qlora_under_fsdp_or_zero3_is_refused_before_the_model_loads(monkeypatch, tmp_path, engine):
    from lmrc.stage2 import engine as engine_mod
    from lmrc.stage2 import train as train_mod

    monkeypatch.setenv("ACCELERATE_USE_FSDP" if engine == "fsdp" else "ACCELERATE_USE_DEEPSPEED", "true")
    cfg = _stage2_cfg("load_in_4bit=true", f"data.train={tmp_path / 'missing.json'}")
    with pytest.raises(LmrcError) as err:
        train_mod.train(cfg, tmp_path / "out")
    assert "load_in_4bit (QLoRA) does not train under" in str(err.value) and "\n" not in str(err.value)
    engine_mod.check_engine(_stage2_cfg("load_in_4bit=true"), "ddp")  # one GPU per process: fine
    engine_mod.check_engine(_stage2_cfg(), engine)  # 16-bit LoRA shards


def test_lora_checkpointing_under_deepspeed_needs_the_release_with_the_zero3_fix(monkeypatch):
    from lmrc.stage2 import engine as engine_mod

    cfg = _stage2_cfg("train.gradient_checkpointing=true")
    monkeypatch.setattr(engine_mod, "_installed_version", lambda name: (0, 19, 2))
    with pytest.raises(LmrcError, match=r"needs deepspeed >= 0\.19\.3 \(this is 0\.19\.2"):
        engine_mod.check_engine(cfg, "deepspeed")
    engine_mod.check_engine(cfg, "ddp")  # torch's own checkpointing under DDP has no such bug
    engine_mod.check_engine(_stage2_cfg(), "deepspeed")  # no checkpointing: no recompute
    monkeypatch.setattr(engine_mod, "_installed_version", lambda name: (0, 19, 3))
    engine_mod.check_engine(cfg, "deepspeed")
    assert engine_mod.DEEPSPEED_CHECKPOINTING_MIN == (0, 19, 3)
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["deepspeed"] == ["deepspeed>=0.19.3"]


def test_installed_versions_are_read_as_release_numbers(monkeypatch):
    from importlib import metadata

    from lmrc.stage2.engine import _installed_version

    monkeypatch.setattr(metadata, "version", lambda name: "0.19.10+cu128")
    assert _installed_version("deepspeed") == (0, 19, 10) > (0, 19, 3)
    assert _installed_version.__module__ == "lmrc.stage2.engine"


def test_qlora_autocasts_to_the_compute_dtype_on_a_gpu():
    from lmrc.stage2.engine import resolve_precision

    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    bf16 = resolve_precision(_stage2_cfg("load_in_4bit=true", "dtype=bfloat16"), cuda, "ddp")
    assert (bf16.load_dtype, bf16.bf16, bf16.fp16, bf16.mixed_precision) == (
        torch.bfloat16,
        True,
        False,
        "bf16",
    )
    fp16 = resolve_precision(_stage2_cfg("load_in_4bit=true", "dtype=float16"), cuda, "ddp")
    assert (fp16.bf16, fp16.fp16, fp16.mixed_precision) == (False, True, "fp16")
    # plain LoRA over bf16 weights: no autocast (the weights are bf16 already), which the Trainer must also be told
    plain = resolve_precision(_stage2_cfg("dtype=bfloat16"), cuda, "ddp")
    assert plain.mixed_precision == "no"


# --------------------------------------------------------------------------- precision the Trainer gets (item 6)


def test_the_trainer_autocasts_as_lmrc_chose_not_as_the_launcher_said(monkeypatch, redocred_dir, tmp_path):
    """accelerate launch --mixed_precision fp16 (or a node's default config) sets ACCELERATE_MIXED_PRECISION;
    TrainingArguments without bf16 / fp16 would take it: fp16 autocast over the weights lmrc loaded."""
    from stage2_helpers import tiny_model_dir

    from lmrc.stage2 import train as train_mod

    seen = []

    class Recording(train_mod.AnswerLossTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            seen.append(self.accelerator.mixed_precision)
            return super().compute_loss(model, inputs, *a, **kw)

    monkeypatch.setattr(train_mod, "AnswerLossTrainer", Recording)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    cfg = load_stage2_config(
        None,
        [f"model={tiny_model_dir()}", f"data.train={redocred_dir / 'dev_50.json'}",
         f"data.rel_info={redocred_dir / 'rel_info.json'}", "data.max_docs=1", "max_seq_len=1024",
         "dtype=float32", "train.batch_size=1", "train.max_steps=1", "train.save_every_steps=0"],
    )  # fmt: skip
    train_mod.train(cfg, tmp_path / "out")
    assert seen and set(seen) == {"no"}


# ---------------------------------------------------------------------------- process-group timeout (item 3)

_DRIVER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist

    stage, out = sys.argv[1], sys.argv[2]
    if stage == "1":
        from lmrc.stage1.config import load_stage1_config
        from lmrc.stage1.accelerator import make_accelerator

        make_accelerator(load_stage1_config(None, ["train.ddp_timeout=4321"]), "no", cuda=False)
    else:
        from lmrc.stage2.config import load_stage2_config
        from lmrc.stage2.engine import join_processes

        join_processes(load_stage2_config(None, ["model=x", "train.ddp_timeout=4321"]), cuda=False)
    group = dist.distributed_c10d._get_default_group()
    seconds = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    with open(f"{out}.{dist.get_rank()}", "w") as fh:
        json.dump(seconds, fh)
    """
)


@pytest.mark.parametrize("stage", ["1", "2"])
def test_the_process_group_waits_train_ddp_timeout(tmp_path, stage):
    """NCCL's default of 10 minutes would end a run whose rank 0 loads a 13B model while the others wait."""
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           stage, str(tmp_path / "timeout")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads((tmp_path / f"timeout.{r}").read_text()) for r in (0, 1)] == [4321.0, 4321.0]


def test_the_trainer_gets_the_same_timeout():
    from lmrc.stage2.engine import Precision
    from lmrc.stage2.trainer import training_arguments

    cfg = _stage2_cfg("train.ddp_timeout=5400")
    args = training_arguments(cfg, Path("/tmp/x"), 4, 0, Precision(torch.float32, False, False), main=True,
                              cuda=False)  # fmt: skip
    assert args.ddp_timeout == 5400
    assert _stage2_cfg().train.ddp_timeout >= 1800  # generous by default
    with pytest.raises(LmrcError, match="ddp_timeout"):
        _stage2_cfg("train.ddp_timeout=0")


# ------------------------------------------------------------------------------------------------ vLLM (item 9)


def _fake_vllm(monkeypatch) -> dict:
    """A stand-in for vllm >= 0.20 recording what lmrc passes to the engine."""
    import types
    from types import SimpleNamespace

    seen: dict = {}

    class LLM:
        def __init__(self, **kw):
            seen["llm"] = kw

        def generate(self, inputs, params, lora_request=None, use_tqdm=True):
            seen["params"], seen["lora"] = params, lora_request
            out = SimpleNamespace(text="x", token_ids=[1], finish_reason="stop")
            return [SimpleNamespace(outputs=[out]) for _ in inputs]

    class Params:
        def __init__(self, **kw):
            self.kw = kw

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, Params
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = type("StructuredOutputsParams", (Params,), {})
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, i, path: (name, i, path)
    for name, mod in {"vllm": vllm, "vllm.sampling_params": sampling, "vllm.lora": types.ModuleType("vllm.lora"),
                      "vllm.lora.request": request}.items():  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)
    return seen


def test_vllm_engine_gets_tensor_parallelism_structured_outputs_and_a_memory_fraction_that_fits(monkeypatch):
    from stage2_helpers import tiny_model_dir

    from lmrc.machine import hardware
    from lmrc.stage2.config import load_stage2_config
    from lmrc.stage2.generate import vllm_backend as generate

    seen = _fake_vllm(monkeypatch)
    released = []
    gib = 1024**3
    monkeypatch.setattr(hardware, "release_cuda_cache", lambda: released.append(True))
    # stage 1 still holds 10 GiB of a 40 GiB GPU: 0.85 of it is not free, vLLM would refuse to start
    monkeypatch.setattr(hardware, "device_memory_used", lambda i: (10 * gib, 40 * gib))
    cfg = load_stage2_config(None, [f"model={tiny_model_dir()}", "generation.tensor_parallel_size=2"])
    gen = generate.VLLMGenerator(cfg, tiny_model_dir(), tiny_model_dir())
    assert released == [True]  # torch's cache is given back before the engine measures free memory
    assert seen["llm"]["tensor_parallel_size"] == 2 and seen["llm"]["enable_lora"] is True
    assert seen["llm"]["gpu_memory_utilization"] == pytest.approx(0.73)
    out = gen.generate([[1, 2, 3]], [8], grammars=['root ::= "x"'])
    assert out[0].text == "x" and seen["lora"][2] == str(tiny_model_dir())
    (params,) = seen["params"]
    assert params.kw["structured_outputs"].kw == {"grammar": 'root ::= "x"'}
    monkeypatch.setattr(hardware, "device_memory_used", lambda i: (1 * gib, 40 * gib))
    generate.VLLMGenerator(cfg, tiny_model_dir(), tiny_model_dir())
    assert seen["llm"]["gpu_memory_utilization"] == 0.85  # enough free memory: as configured


def _model_dir(tmp_path: Path, window: int) -> Path:
    """An adapter-and-model folder as far as the engine's settings go: a config.json and a tokenizer."""
    from stage2_helpers import tiny_model_dir

    folder = tmp_path / "model"
    folder.mkdir()
    for name in os.listdir(tiny_model_dir()):
        if "tokenizer" in name or name == "special_tokens_map.json":
            (folder / name).write_bytes((tiny_model_dir() / name).read_bytes())
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": window}))
    return folder


def test_vllm_reserves_the_prompts_budget_not_the_models_window(monkeypatch, tmp_path):
    from lmrc.machine import hardware
    from lmrc.stage2.generate import vllm_backend as generate

    seen = _fake_vllm(monkeypatch)
    monkeypatch.setattr(hardware, "device_memory_used", lambda i: None)
    monkeypatch.setattr(hardware, "release_cuda_cache", lambda: None)
    llama31 = _model_dir(tmp_path, 131072)
    cfg = load_stage2_config(None, [f"model={llama31}", "max_seq_len=4096", "dtype=bfloat16"])
    generate.VLLMGenerator(cfg, llama31, llama31)
    assert seen["llm"]["max_model_len"] == 4096 and seen["llm"]["dtype"] == "bfloat16"
    cfg.max_seq_len = 200_000  # more than the model's window: the window
    generate.VLLMGenerator(cfg, llama31, llama31)
    assert seen["llm"]["max_model_len"] == 131072


def test_vllm_serves_in_the_dtype_training_used(monkeypatch, tmp_path):
    """vLLM's own "auto" is the model config's dtype, and float16 for a float32 config."""
    from lmrc.stage2.generate import vllm_backend as generate

    monkeypatch.setattr(generate, "_cuda_native_bf16", lambda: True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cfg = _stage2_cfg("dtype=auto")
    assert generate._vllm_dtype(cfg, adapter) == "bfloat16"  # auto resolves as training resolves it
    (adapter / "train_summary.json").write_text(json.dumps({"dtype": "float32"}))
    assert generate._vllm_dtype(cfg, adapter) == "float32"  # what this adapter was trained in
    assert generate._vllm_dtype(_stage2_cfg("dtype=float16"), adapter) == "float16"  # the config's own
    (adapter / "train_summary.json").write_text(json.dumps({"dtype": "bfloat16"}))
    monkeypatch.setattr(generate, "_cuda_native_bf16", lambda: False)  # a V100 serving a bf16-trained adapter
    assert generate._vllm_dtype(cfg, adapter) == "float16"


def test_vllm_memory_fraction_fits_every_tensor_parallel_device(monkeypatch):
    from lmrc.machine import hardware
    from lmrc.stage2.generate import vllm_backend as generate

    gib = 1024**3
    used = {0: 2 * gib, 1: 20 * gib, 2: 30 * gib}  # GPU 1 is half taken by another job; GPU 2 is not used
    asked = []
    monkeypatch.setattr(hardware, "device_memory_used", lambda i: asked.append(i) or (used[i], 40 * gib))
    monkeypatch.setattr(hardware, "release_cuda_cache", lambda: None)
    assert generate._vllm_memory_fraction(0.85, range(2)) == pytest.approx(0.48)
    assert asked == [0, 1]
    assert generate._vllm_memory_fraction(0.85, range(1)) == 0.85


def test_vllm_before_structured_outputs_is_refused_with_the_floor(monkeypatch):
    import types

    from lmrc.stage2.generate import vllm_backend as generate

    monkeypatch.setitem(sys.modules, "vllm.sampling_params", types.ModuleType("vllm.sampling_params"))
    with pytest.raises(LmrcError, match=r"needs vLLM >= 0\.20"):
        generate._structured_outputs_api()
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == [f"vllm>={generate.VLLM_MIN}"]

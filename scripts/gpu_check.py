"""`make gpu-check`: does this GPU machine run lmrc? One line per check: pass, fail (with the error) or skipped (why).

On the visible GPUs, with tiny random models and tokenizers built on the spot from the sample documents (no
download, no model wheel needed) and a few Re-DocRED documents ($LMRC_DATA_DIR/redocred/dev_50.json, as
`make demo` finds them), it checks:

    stage1-bf16           stage-1 training in bf16 autocast (GPUs with native bf16)
    stage1-fp16           stage-1 training in fp16 with the loss scaler
    stage1-kill-resume    `lmrc stage1 train` killed by SIGTERM, then --resume to the end
    stage1-predict        `lmrc predict --mode stage1-only` on the GPU
    stage2-lora-resume    stage-2 LoRA training (bf16, else fp16 + scaler) with gradient checkpointing and
                          grad_accum 2 (both asserted on the prepared model), paused, then --resume
    qlora-4bit            stage-2 training with a 4-bit NF4 base (bitsandbytes), bf16 autocast where native
    fsdp                  `accelerate launch` with configs/accelerate/fsdp.yaml on 2 processes when >= 2 GPUs are
                          visible (the decoder layers' flat parameters asserted sharded), else 1 process (FSDP
                          falls back to NO_SHARD: wraps, trains and saves, sharding not proven); checkpointing on
    zero3                 the same with DeepSpeed ZeRO-3 and stage3_param_persistence_threshold 0, so that every
                          weight is partitioned (asserted: none resident after a step), checkpointing on
    hf-xgrammar-prefix    `lmrc stage2 predict`, hf backend, xgrammar constraints and prefix caching
    vllm-lora-structured  `lmrc stage2 predict`, vLLM backend with the LoRA adapter and structured outputs
    predict-classifier-llm  `lmrc predict --mode classifier-llm` end to end

Each check runs in its own process group (a CUDA error cannot take the others down; a check that runs past its
time is killed with everything it started, e.g. vLLM's engine processes, which would keep GPU memory); its peak
GPU memory is what torch reserved in that process and, polled from NVML (or the CUDA runtime) while it runs, the
device's peak use above the starting point (this catches vLLM's engine process). A missing optional package skips
its check with the pip line that adds it. Writes a JSON report (--out) and prints a table. Without a CUDA device it
prints one line and exits 0 with every check skipped. `--allow-cpu` runs what a CPU can (for working on this script).

    python scripts/gpu_check.py [--out runs/gpu_check/report.json] [--only NAME ...] [--allow-cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKS = [
    "stage1-bf16",
    "stage1-fp16",
    "stage1-kill-resume",
    "stage1-predict",
    "stage2-lora-resume",
    "qlora-4bit",
    "fsdp",
    "zero3",
    "hf-xgrammar-prefix",
    "vllm-lora-structured",
    "predict-classifier-llm",
]
NEEDS = {  # a check that uses another's output is skipped when that one did not pass
    "stage1-kill-resume": [],
    "stage1-predict": ["stage1-fp16"],
    "hf-xgrammar-prefix": ["stage2-lora-resume"],
    "vllm-lora-structured": ["stage2-lora-resume"],
    "predict-classifier-llm": ["stage1-fp16", "stage2-lora-resume"],
}
CHECK_TIMEOUT_S = 300


class Skip(Exception):
    """A check that cannot run here, with why (and the pip line when a package is missing)."""


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _need_module(module: str, pip: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} is not installed: {pip}")


# ------------------------------------------------------------------------------------------------- fixtures


def _data(work: Path) -> dict[str, Path]:
    """A few short labelled Re-DocRED documents: train (6) and tune / predict (2) files, and the relation set."""
    data_dir = os.environ.get("LMRC_DATA_DIR")
    src = Path(data_dir) / "redocred" if data_dir else None
    if src is None or not (src / "dev_50.json").is_file() or not (src / "rel_info.json").is_file():
        raise Skip(
            "no Re-DocRED sample: set LMRC_DATA_DIR to the folder with redocred/dev_50.json (make demo)"
        )
    out = work / "data"
    if not (out / "tune.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        docs = json.loads((src / "dev_50.json").read_text(encoding="utf-8"))
        docs = sorted((d for d in docs if d.get("labels")), key=lambda d: sum(len(s) for s in d["sents"]))
        (out / "train.json").write_text(json.dumps(docs[:6]), encoding="utf-8")
        (out / "tune.json").write_text(json.dumps(docs[6:8]), encoding="utf-8")
    return {"train": out / "train.json", "tune": out / "tune.json", "rel_info": src / "rel_info.json"}


def _corpus(work: Path) -> list[str]:
    """What the tiny tokenizers are trained on: the sample documents, the relation names and the prompt templates
    (so that prompts and answers tokenize into known pieces)."""
    d = _data(work)
    texts = []
    for name in ("train", "tune"):
        for doc in json.loads(d[name].read_text(encoding="utf-8")):
            texts.extend(" ".join(sent) for sent in doc["sents"])
    texts.extend(json.loads(d["rel_info"].read_text(encoding="utf-8")).values())
    texts.extend(p.read_text(encoding="utf-8") for p in sorted((REPO / "prompts").glob("*.txt")))
    return texts


def wordpiece_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A BERT-style WordPiece tokenizer ([CLS] A [SEP] B [SEP]) trained on `texts` with the `tokenizers` library:
    no tokenizer files to download or install (the packaged MiniLM wheel is optional)."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=list(string.printable.strip())
    )
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=512,
    )  # fmt: skip


def byte_bpe_tokenizer(texts: list[str], vocab_size: int = 4000):
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 style: any text encodes, no unknown token) trained on `texts`,
    with one end-of-text token as EOS: what stage 2, xgrammar and vLLM need of a causal LM's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, model_max_length=4096)


def _tiny_bert(work: Path) -> Path:
    """A random 2-layer, 64-d BERT on a WordPiece vocabulary trained from the sample documents."""
    folder = work / "tiny-bert"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = wordpiece_tokenizer(_corpus(work))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    tokenizer.save_pretrained(folder)
    BertModel(config).save_pretrained(folder)  # config.json last: it marks a complete folder
    return folder


def _tiny_llama(work: Path) -> Path:
    """A random 2-layer Llama on a byte-level BPE trained from the sample documents; head size 32 (vLLM's
    attention kernels need >= 32)."""
    folder = work / "tiny-llama"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_bpe_tokenizer(_corpus(work))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    tokenizer.save_pretrained(folder)
    LlamaForCausalLM(config).save_pretrained(folder)  # config.json last: it marks a complete folder
    return folder


def _precision(cuda: bool) -> tuple[str, str]:
    """(stage-1 mixed_precision, stage-2 dtype) for this device: bf16 where native, else fp16; float32 on CPU."""
    if not cuda:
        return "no", "float32"
    from lmrc.machine.hardware import cuda_supports_bf16

    return ("bf16", "bfloat16") if cuda_supports_bf16() else ("fp16", "float16")


def _stage1_sets(work: Path, out: Path, mixed_precision: str, *extra: str) -> list[str]:
    d = _data(work)
    return [
        f"model.encoder={_tiny_bert(work)}",
        "model.emb_size=64",
        "model.block_size=16",
        f"data.train={d['train']}",
        f"data.tune={d['tune']}",
        f"data.rel_info={d['rel_info']}",
        f"data.cache_dir={work / 'features'}",
        "train.epochs=2",
        "train.batch_size=2",
        "train.lr_encoder=1e-3",
        "train.lr_head=1e-3",
        f"train.mixed_precision={mixed_precision}",
        f"output_dir={out}",
        *extra,
    ]


def _stage2_sets(work: Path, dtype: str, *extra: str) -> list[str]:
    d = _data(work)
    return [
        f"model={_tiny_llama(work)}",
        f"data.train={d['train']}",
        f"data.rel_info={d['rel_info']}",
        "data.max_docs=2",
        "max_seq_len=1024",
        f"dtype={dtype}",
        "train.batch_size=1",
        "train.warmup_steps=0",
        "train.lr=1e-3",
        "train.max_steps=4",
        "train.save_every_steps=2",
        *extra,
    ]


def run_group(cmd: list[str], timeout: float, **kw) -> tuple[int | None, str, str]:
    """Run `cmd` in a new session (its own process group); (exit code, stdout, stderr), exit code None when it ran
    past `timeout`: then the whole group is killed, with what it started (accelerate's ranks, vLLM's engine
    processes), which would otherwise live on holding GPU memory."""
    proc = subprocess.Popen(
        cmd, cwd=kw.pop("cwd", REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **kw,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        return None, out, (err or "") + f"\ntimed out after {timeout:.0f} s (process group killed)"


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group led by `proc`, SIGKILL to what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            proc.poll()  # reap the leader: a zombie would keep the group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


# A command a check runs in its own session must time out before the check does: killing the check's process
# group would not reach that session.
INNER_TIMEOUT_S = CHECK_TIMEOUT_S - 30


def _cli(args: list[str], timeout: float = INNER_TIMEOUT_S, launcher: list[str] | None = None) -> str:
    """Run `lmrc ARGS` (or through `launcher`) in a subprocess; its output, or an error with its last lines."""
    cmd = (launcher or [sys.executable]) + ["-m", "lmrc", *args]
    rc, out, err = run_group(cmd, timeout)
    if rc != 0:
        tail = (err or out).strip().splitlines()[-5:]
        raise RuntimeError(f"exit {rc}: " + " | ".join(tail))
    return out


def _sets(pairs: list[str]) -> list[str]:
    return [x for s in pairs for x in ("--set", s)]


# ----------------------------------------------------------------------------------------------------- checks


def check_stage1_bf16(work: Path, cuda: bool) -> str:
    from lmrc.machine.hardware import cuda_supports_bf16

    if cuda and not cuda_supports_bf16():
        raise Skip("this GPU has no native bf16 (compute capability < 8.0); stage1-fp16 covers it")
    return _stage1_train(work, "stage1-bf16", "bf16" if cuda else "no")


def check_stage1_fp16(work: Path, cuda: bool) -> str:
    detail = _stage1_train(work, "stage1-fp16", "fp16" if cuda else "no")
    if cuda:
        from lmrc.training.run_folder import read_resume_state

        if read_resume_state(work / "stage1-fp16" / "last").scaler is None:
            raise RuntimeError("no loss-scaler state saved: fp16 trained without a GradScaler")
        detail += ", loss scaler saved"
    return detail


def _stage1_train(work: Path, name: str, mixed_precision: str) -> str:
    from lmrc.stage1.config import load_stage1_config
    from lmrc.stage1.train import train

    out = work / name
    result = train(load_stage1_config(None, _stage1_sets(work, out, mixed_precision)))
    losses = [loss for _, loss in result.step_losses]
    if not result.finished or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"finished={result.finished}, losses {losses}")
    return f"{result.global_step} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} ({mixed_precision})"


def check_stage1_kill_resume(work: Path, cuda: bool) -> str:
    out = work / "stage1-kill"
    mp = _precision(cuda)[0]
    sets = _stage1_sets(work, out, mp, "train.epochs=8", "train.save_every_steps=1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmrc", "stage1", "train", *_sets(sets)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = out / "last" / "trainer_state.json"
    deadline = time.time() + CHECK_TIMEOUT_S / 2
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["global_step"] >= 2:
            break
        time.sleep(0.2)
    if proc.poll() is not None:
        raise RuntimeError(f"the run ended before it could be killed (exit {proc.returncode})")
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    killed_at = json.loads(state.read_text())["global_step"]
    _cli(["stage1", "train", "--resume", "--output-dir", str(out)])
    final = json.loads(state.read_text())
    if not final["done"] or final["global_step"] != final["total_steps"]:
        raise RuntimeError(f"after --resume: step {final['global_step']} of {final['total_steps']}")
    return f"SIGTERM (exit {rc}) at step {killed_at}, resumed to step {final['global_step']}"


def check_stage1_predict(work: Path, cuda: bool) -> str:
    d = _data(work)
    out = work / "stage1-predict.json"
    _cli(["predict", "--stage1", str(work / "stage1-fp16" / "best"), "--input", str(d["tune"]),
          "--output", str(out), "--mode", "stage1-only"])  # fmt: skip
    return f"{len(json.loads(out.read_text()))} relations predicted"


# Every stage-2 training check runs what a large model needs: activations recomputed, micro-batches accumulated.
STAGE2_MEMORY_SETS = ("train.gradient_checkpointing=true", "train.grad_accum=2")


def probe_callback(path: Path):
    """A TrainerCallback that writes, after the first optimizer step, what the prepared model really does
    (`inspect_model`) and the Trainer's accumulation, to `path` (JSON)."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if not path.exists() and model is not None:
                report = inspect_model(model)
                report["grad_accum"] = args.gradient_accumulation_steps
                path.write_text(json.dumps(report))
            return control

    return Probe()


def inspect_model(model) -> dict:
    """Gradient checkpointing on the decoder layers, and how the weights lie on this rank between steps:
    FSDP units (flat parameters: elements held here vs unsharded; NO_SHARD holds all) or ZeRO-3 parameters
    (elements of their partitions here vs whole, and how many are resident outside a forward)."""
    report: dict = {
        "checkpointing": any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()),
        "fsdp_units": 0, "zero3_params": 0, "local_elements": 0, "full_elements": 0, "resident": 0,
    }  # fmt: skip
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        FSDP = None
    for m in model.modules():
        if FSDP is not None and isinstance(m, FSDP):
            flat = getattr(m, "_flat_param", None)
            if flat is not None:
                report["fsdp_units"] += 1
                report["local_elements"] += flat.numel()
                report["full_elements"] += flat._unpadded_unsharded_size.numel()
    for p in model.parameters():
        if hasattr(p, "ds_numel"):
            report["zero3_params"] += 1
            report["full_elements"] += int(p.ds_numel)
            report["local_elements"] += int(p.ds_tensor.numel())
            report["resident"] += int(p.data.numel() > 0)
    return report


def _require_memory_settings(probe: dict) -> str:
    if not probe.get("checkpointing"):
        raise RuntimeError(f"gradient checkpointing is not on in the trained model: {probe}")
    if probe.get("grad_accum") != 2:
        raise RuntimeError(f"the Trainer accumulated {probe.get('grad_accum')} micro-batches, not 2")
    return "checkpointing on, grad_accum 2"


def check_stage2_lora_resume(work: Path, cuda: bool) -> str:
    from lmrc.stage2.config import load_stage2_config
    from lmrc.stage2.train import train

    dtype = _precision(cuda)[1]
    cfg = load_stage2_config(None, _stage2_sets(work, dtype, *STAGE2_MEMORY_SETS))
    out = work / "stage2-adapter"
    probe = work / "stage2-adapter.probe.json"
    probe.unlink(missing_ok=True)
    paused = train(cfg, out, stop_after_steps=2, callbacks=[probe_callback(probe)])
    final = train(cfg, out, resume=True)
    if paused.finished or not final.finished or not (out / "adapter_model.safetensors").is_file():
        raise RuntimeError(f"paused at {paused.steps}, then finished={final.finished} at {final.steps}")
    settings = _require_memory_settings(json.loads(probe.read_text()))
    losses = paused.losses + final.losses
    return (
        f"{final.steps} steps ({dtype}, {settings}), paused at 2 and resumed, "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )


def check_qlora_4bit(work: Path, cuda: bool) -> str:
    if not cuda:
        raise Skip("QLoRA needs CUDA")
    _need_module("bitsandbytes", "pip install 'lmrc[gpu]'  (bitsandbytes)")
    from lmrc.stage2.config import load_stage2_config
    from lmrc.stage2.train import train

    dtype = _precision(cuda)[1]
    cfg = load_stage2_config(None, _stage2_sets(work, dtype, "load_in_4bit=true", "train.save_every_steps=0"))
    result = train(cfg, work / "qlora")
    if not result.finished or not all(math.isfinite(x) for x in result.losses):
        raise RuntimeError(f"finished={result.finished}, losses {result.losses}")
    return f"{result.steps} steps on a 4-bit NF4 base, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}"


def _processes() -> int:
    """2 when two GPUs are visible (sharding over 2 ranks can be checked), else 1."""
    import torch

    return 2 if torch.cuda.device_count() >= 2 else 1


def zero3_config(work: Path) -> Path:
    """configs/accelerate/deepspeed_zero3.yaml, but with a DeepSpeed JSON that sets
    stage3_param_persistence_threshold 0: by default ZeRO-3 keeps every weight under 100k elements (all of a tiny
    model's) whole on every rank, and the check could not tell a partitioned model from a replicated one."""
    import yaml

    base = yaml.safe_load((REPO / "configs/accelerate/deepspeed_zero3.yaml").read_text())
    ds = base.pop("deepspeed_config")
    auto = "auto"
    ds_json = {
        "zero_optimization": {
            "stage": ds["zero_stage"],
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": ds["zero3_save_16bit_model"],
            "offload_optimizer": {"device": ds["offload_optimizer_device"]},
            "offload_param": {"device": ds["offload_param_device"]},
        },
        "bf16": {"enabled": auto},
        "fp16": {"enabled": auto},
        "train_micro_batch_size_per_gpu": auto,
        "train_batch_size": auto,
        "gradient_accumulation_steps": auto,
        "gradient_clipping": auto,
    }
    folder = work / "accelerate"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero3.json").write_text(json.dumps(ds_json, indent=2))
    base["deepspeed_config"] = {
        "deepspeed_config_file": str(folder / "zero3.json"),
        "zero3_init_flag": ds["zero3_init_flag"],
    }
    base.pop("mixed_precision", None)  # the JSON's "auto" follows the Trainer's bf16 / fp16
    (folder / "zero3.yaml").write_text(yaml.safe_dump(base))
    return folder / "zero3.yaml"


def _launched(work: Path, cuda: bool, name: str, config: Path) -> tuple[str, list[dict], int]:
    """Stage-2 training under `accelerate launch --config_file CONFIG` on `_processes()` ranks, each running
    this script's --launched-train (train() with a probe); the summary line, each rank's probe, the world size."""
    if not cuda:
        raise Skip(f"{name} needs CUDA")
    mp, dtype = _precision(cuda)
    out = work / name
    world = _processes()
    sets = _stage2_sets(work, dtype, "train.save_every_steps=0", *STAGE2_MEMORY_SETS)
    spec = work / f"{name}.spec.json"
    spec.write_text(json.dumps({"sets": sets, "output_dir": str(out)}))
    for old in work.glob(f"{name}.probe.*.json"):
        old.unlink()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(world),
           "--config_file", str(config), "--mixed_precision", mp,
           str(Path(__file__).resolve()), "--launched-train", str(spec)]  # fmt: skip
    rc, stdout, err = run_group(cmd, INNER_TIMEOUT_S)
    if rc != 0:
        raise RuntimeError(f"exit {rc}: " + " | ".join((err or stdout).strip().splitlines()[-5:]))
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    empty = [k for k, v in weights.items() if v.numel() == 0]
    if not weights or empty:
        raise RuntimeError(
            f"saved adapter has empty tensors (a shard, not the gathered weights): {empty[:3]}"
        )
    probes = [json.loads((work / f"{name}.probe.{r}.json").read_text()) for r in range(world)]
    settings = _require_memory_settings(probes[0])
    summary = json.loads((out / "train_summary.json").read_text())
    line = (
        f"engine {summary.get('engine')} on {world} process(es), {summary['steps']} steps ({settings}), "
        f"adapter of {len(weights)} tensors gathered"
    )
    return line, probes, world


def launched_train(spec_path: Path) -> None:
    """One rank of a launched check: stage-2 training with the probe (--launched-train SPEC)."""
    from lmrc.stage2.config import load_stage2_config
    from lmrc.stage2.train import train

    spec = json.loads(spec_path.read_text())
    rank = int(os.environ.get("RANK", "0"))
    probe = spec_path.with_name(spec_path.name.replace(".spec.json", f".probe.{rank}.json"))
    train(load_stage2_config(None, spec["sets"]), spec["output_dir"], callbacks=[probe_callback(probe)])


def check_fsdp(work: Path, cuda: bool) -> str:
    line, probes, world = _launched(work, cuda, "fsdp", REPO / "configs/accelerate/fsdp.yaml")
    units = probes[0]["fsdp_units"]
    if not units:
        raise RuntimeError(f"no FSDP unit found in the trained model: {probes[0]}")
    if world == 1:
        return line + f"; {units} FSDP units, 1 process: NO_SHARD, sharding not proven (needs 2 GPUs)"
    for r, p in enumerate(probes):
        if not p["local_elements"] * world <= p["full_elements"] + world * units:  # flat params pad to world
            raise RuntimeError(
                f"rank {r} holds {p['local_elements']} of {p['full_elements']} elements: not sharded"
            )
    return line + f"; {units} FSDP units, each rank holds ~1/{world} of the flat parameters"


def check_zero3(work: Path, cuda: bool) -> str:
    if cuda:
        _need_module("deepspeed", "pip install 'lmrc[deepspeed]'")
    line, probes, world = _launched(work, cuda, "zero3", zero3_config(work) if cuda else Path())
    for r, p in enumerate(probes):
        if not p["zero3_params"]:
            raise RuntimeError(f"rank {r}: no ZeRO-3 parameter in the trained model: {p}")
        if p["resident"]:
            raise RuntimeError(
                f"rank {r}: {p['resident']} of {p['zero3_params']} weights stay whole after a step"
            )
        if world > 1 and not p["local_elements"] * world <= p["full_elements"] + world * p["zero3_params"]:
            raise RuntimeError(f"rank {r} holds {p['local_elements']} of {p['full_elements']} elements")
    return line + f"; all {probes[0]['zero3_params']} weights partitioned over {world} rank(s)"


def _stage2_predict(work: Path, name: str, backend: str) -> str:
    d = _data(work)
    out = work / f"{name}.json"
    sets = [f"generation.backend={backend}", "generation.constrained=true", "generation.prefix_cache=true"]
    _cli(["stage2", "predict", "--adapter", str(work / "stage2-adapter"), "--input", str(d["tune"]),
          "--gold-pairs", "--output", str(out), *_sets(sets)])  # fmt: skip
    return f"{len(json.loads(out.read_text()))} relations from {backend} generation (constrained)"


def check_hf_xgrammar_prefix(work: Path, cuda: bool) -> str:
    _need_module("xgrammar", "pip install 'lmrc[constrained]'  (xgrammar)")
    return _stage2_predict(work, "hf-xgrammar-prefix", "hf")


def check_vllm_lora_structured(work: Path, cuda: bool) -> str:
    if not cuda:
        raise Skip("vLLM needs CUDA")
    _need_module("vllm", "pip install 'lmrc[vllm]'")
    return _stage2_predict(work, "vllm-lora-structured", "vllm")


def check_predict_classifier_llm(work: Path, cuda: bool) -> str:
    d = _data(work)
    out = work / "classifier-llm.json"
    _cli(["predict", "--stage1", str(work / "stage1-fp16" / "best"), "--stage2", str(work / "stage2-adapter"),
          "--input", str(d["tune"]), "--output", str(out), "--mode", "classifier-llm", "--max-per-doc", "4"])  # fmt: skip
    return f"{len(json.loads(out.read_text()))} relations end to end"


# -------------------------------------------------------------------------------------------------- running


def run_child(name: str, work: Path, result_path: Path, allow_cpu: bool) -> None:
    """One check in this process; writes {status, detail, torch peaks}."""
    import torch

    from lmrc.machine.hardware import gpu_memory, reset_gpu_peaks

    cuda = torch.cuda.is_available()
    reset_gpu_peaks()
    record: dict = {"name": name}
    try:
        if not cuda and not allow_cpu:
            raise Skip("no CUDA device")
        record["detail"] = globals()["check_" + name.replace("-", "_")](work, cuda)
        record["status"] = "pass"
    except Skip as exc:
        record.update(status="skipped", detail=str(exc))
    except BaseException as exc:  # noqa: BLE001 - a failed check is reported, whatever it raised
        text = str(exc).strip().replace("\n", " | ")
        record.update(status="fail", detail=f"{type(exc).__name__}: {text}"[:600])
    mem = gpu_memory()
    record["peak_reserved_gib"] = max((m["peak_reserved_gib"] for m in mem), default=None)
    result_path.write_text(json.dumps(record))


class _DevicePoller:
    """The memory in use (all processes) on the visible devices together, polled while a check runs; its peak
    above the start (a two-process check uses two GPUs)."""

    def __init__(self) -> None:
        import torch

        from lmrc.machine.hardware import device_memory_used

        self.read = device_memory_used
        self.devices = range(max(1, torch.cuda.device_count()))
        self.base = self._used()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _used(self) -> int | None:
        readings = [self.read(i) for i in self.devices]
        return sum(r[0] for r in readings if r) if any(readings) else None

    def _poll(self) -> None:
        while not self._stop.wait(0.25):
            used = self._used()
            if used is not None and (self.peak is None or used > self.peak):
                self.peak = used

    def __enter__(self) -> _DevicePoller:
        if self.base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def peak_gib(self) -> float | None:
        if self.base is None or self.peak is None:
            return None
        return round((self.peak - self.base) / 1024**3, 3)


def run_all(names: list[str], work: Path, allow_cpu: bool) -> list[dict]:
    results: list[dict] = []
    status: dict[str, str] = {}
    for name in names:
        failed = [n for n in NEEDS.get(name, []) if status.get(n, "pass") != "pass"]
        if failed:
            rec = {"name": name, "status": "skipped", "detail": f"needs {', '.join(failed)} (did not pass)"}
        else:
            result_path = work / f"{name}.result.json"
            result_path.unlink(missing_ok=True)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--workdir",
                str(work),
                "--result",
                str(result_path),
            ]
            cmd += ["--allow-cpu"] if allow_cpu else []
            start = time.perf_counter()
            with _DevicePoller() as poller:
                rc, _, err = run_group(cmd, CHECK_TIMEOUT_S)
            if result_path.is_file():
                rec = json.loads(result_path.read_text())
            else:
                tail = " | ".join((err or "").strip().splitlines()[-3:])
                rec = {
                    "name": name,
                    "status": "fail",
                    "detail": f"the check process died (exit {rc}): {tail}",
                }
            rec["seconds"] = round(time.perf_counter() - start, 1)
            rec["device_peak_gib"] = poller.peak_gib()
        status[name] = rec["status"]
        results.append(rec)
        print(_row(rec), flush=True)
    return results


def _row(rec: dict) -> str:
    mem = rec.get("peak_reserved_gib")
    dev = rec.get("device_peak_gib")
    memory = "" if mem is None and dev is None else f"  [torch {mem} GiB, device +{dev} GiB]"
    secs = f" {rec['seconds']:.0f}s" if rec.get("seconds") is not None else ""
    return f"{rec['status']:<8}{rec['name']:<24}{secs:>6}  {rec.get('detail', '')}{memory}"


def machine() -> dict:
    import torch

    from lmrc.machine.hardware import describe

    info = describe()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 1024**3, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["cuda_runtime"] = torch.version.cuda
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check" / "report.json")
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: next to --out)")
    ap.add_argument("--only", nargs="+", choices=CHECKS, help="run only these checks")
    ap.add_argument("--allow-cpu", action="store_true", help="run what a CPU can (developing this script)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--launched-train", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.workdir or args.out.parent / "work"
    if args.launched_train:
        launched_train(args.launched_train)
        return 0
    if args.child:
        run_child(args.child, work, args.result, args.allow_cpu)
        return 0
    names = args.only or CHECKS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not _has_cuda() and not args.allow_cpu:
        print("gpu-check: no CUDA device: every check skipped")
        results = [{"name": n, "status": "skipped", "detail": "no CUDA device"} for n in names]
    else:
        work.mkdir(parents=True, exist_ok=True)
        info = machine()
        print(f"gpu-check on {info.get('gpu', 'CPU (--allow-cpu)')} ({info.get('gpu_memory_gib', '-')} GiB), "
              f"torch {info['torch']}; report: {args.out}")  # fmt: skip
        results = run_all(names, work, args.allow_cpu)
        counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skipped")}
        print(f"gpu-check: {counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped")
    report = {
        "machine": machine(),
        "checks": results,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.out)
    return 1 if any(r["status"] == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())

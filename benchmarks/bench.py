"""`make bench`: speed and memory of both stages on this machine, written to benchmarks/results/<kind>.json and
rendered into docs/PERFORMANCE.md (one table per machine kind: CPU capability and native bf16 differ).

    python benchmarks/bench.py [--parts stage1_train,stage1_infer,...] [--reps 3] [--quick]

Every part runs in its own process, so its peak memory (VmHWM) is its own. Times are medians of `--reps`
repetitions; ratios ("x faster") are measured side by side in one run. Parts:

- stage1_train: MiniLM + ATL training steps on real Re-DocRED batches (length-grouped, batch 4, the precision
  `auto` picks): documents/s, word-pieces/s, peak memory; the time of the encoder's own forward + backward on the
  same batch against the whole step, beside their FLOP counts (torch.utils.flop_counter), so the head's time share
  can be held against its FLOP share; padding share of length-grouped vs shuffled batches.
- stage1_infer: inference documents/s and pairs/s, length-grouped batches vs file order.
- stage2_generate: greedy decoding (KV cache) tokens/s at batch 1, 4, 8, 16 with smollm2-135m on real rc prompts.
- stage2_lora: LoRA training tokens/s and peak memory, with and without gradient checkpointing.
- stage2_per_doc: per document, for direct (all pairs) and rc (gold pairs): prompts, prompt tokens, prefill
  tokens, generated tokens and seconds with smollm2-135m; direct with and without prefix caching side by side.
- predict_memory: `lmrc predict` (stage1-only, tiny model) peak memory on 50 vs 500 documents.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PARTS = ("stage1_train", "stage1_infer", "stage2_generate", "stage2_per_doc", "stage2_lora", "predict_memory")
ALL_PARTS = PARTS + ("stage2_lora_checkpointing",)
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _data_path(name: str) -> Path:
    d = os.environ.get("LMRC_DATA_DIR")
    if not d:
        sys.exit("bench: set LMRC_DATA_DIR (the Makefile points it at ../shared/data)")
    return Path(d) / "redocred" / name


def _docs(n: int, name: str = "dev_50.json"):
    from lmrc.data.docred import load_documents
    from lmrc.data.relations import load_relations

    rel = load_relations(_data_path("rel_info.json"))
    return rel, load_documents(_data_path(name), rel)[:n]


def _peak_gib() -> float:
    from lmrc.predict.run import peak_rss_gib

    return peak_rss_gib()


def _reset_peak() -> bool:
    """Linux: restart the peak-RSS counter (VmHWM) so that a part measures its own loop, not its set-up."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _median(xs):
    return round(statistics.median(xs), 4)


# ------------------------------------------------------------------------------------------------- stage 1


def part_stage1_train(reps: int, quick: bool) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lmrc.machine.hardware import resolve_mixed_precision
    from lmrc.stage1.encoder import encode, load_encoder
    from lmrc.stage1.features import collate, featurize_all, length_grouped_batches
    from lmrc.stage1.losses import build_loss
    from lmrc.stage1.model import Stage1Model

    rel, docs = _docs(8 if quick else 16)
    encoder, tok = load_encoder("minilm")
    loss = build_loss("atl")
    model = Stage1Model(encoder, loss.num_logits(len(rel))).train()
    feats = featurize_all(docs, tok, rel)
    precision = resolve_mixed_precision(os.environ.get("LMRC_BENCH_PRECISION", "auto"), cuda=False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def full(inputs):
        with autocast:
            logits = model(inputs["input_ids"], inputs["attention_mask"], inputs["entity_pos"], inputs["hts"])
        loss(logits.float(), inputs["labels"]).backward()
        model.zero_grad(set_to_none=True)

    def encoder_only(inputs):
        """The windowed encoder alone (hidden states and attentions, both used by the head), forward + backward."""
        with autocast:
            hidden, attention = encode(model.encoder, inputs["input_ids"], inputs["attention_mask"], model.window,
                                       model.specials, model.n_layers_avg)  # fmt: skip
        (hidden.float().sum() + attention.float().sum()).backward()
        model.zero_grad(set_to_none=True)

    def padding(fs, batches):
        real = sum(len(fs[j].input_ids) for b in batches for j in b)
        padded = sum(max(len(fs[j].input_ids) for j in b) * len(b) for b in batches)
        return 1 - real / padded

    import random

    from lmrc.models.store import default_cache_dir

    # Padding is a property of a whole training epoch: measured on all of train_450.json (tokenisation only).
    train_feats = featurize_all(
        _docs(10**6, "train_450.json")[1], tok, rel, cache_dir=default_cache_dir() / "features"
    )
    order = list(range(len(train_feats)))
    random.Random(0).shuffle(order)
    shuffled = [order[i : i + 4] for i in range(0, len(order), 4)]
    grouped_epoch = length_grouped_batches(train_feats, 4, seed=0)
    batches = length_grouped_batches(feats, 4, seed=0)
    full(collate([feats[j] for j in batches[0]]))  # warm-up
    setup_peak = _peak_gib()
    _reset_peak()
    step_t, enc_t = [], []
    for _ in range(reps):
        t_full = t_enc = 0.0
        for b in batches:
            inputs = collate([feats[j] for j in b])
            t0 = time.perf_counter()
            full(inputs)
            t1 = time.perf_counter()
            encoder_only(inputs)
            t2 = time.perf_counter()
            t_full += t1 - t0
            t_enc += t2 - t1
        step_t.append(t_full)
        enc_t.append(t_enc)
    inputs = collate([feats[j] for j in batches[0]])
    with FlopCounterMode(display=False) as fc_full:
        full(inputs)
    with FlopCounterMode(display=False) as fc_enc:
        encoder_only(inputs)
    f_full, f_enc = fc_full.get_total_flops(), fc_enc.get_total_flops()
    total, enc = statistics.median(step_t), statistics.median(enc_t)
    tokens = sum(len(f.input_ids) for f in feats)
    head_time = max(0.0, 1 - enc / total)
    head_flops = max(0.0, 1 - f_enc / f_full)
    return {
        "documents": len(feats),
        "batch_size": 4,
        "precision": precision,
        "seconds_per_epoch": round(total, 3),
        "documents_per_s": round(len(feats) / total, 3),
        "word_pieces_per_s": round(tokens / total, 1),
        "head_time_share": round(head_time, 4),
        "head_flop_share": round(head_flops, 4),
        "head_time_over_flop_share": round(head_time / head_flops, 3) if head_flops else None,
        "padding_share_length_grouped": round(padding(train_feats, grouped_epoch), 4),
        "padding_share_shuffled": round(padding(train_feats, shuffled), 4),
        "peak_rss_gib_training_steps": _peak_gib(),
        "peak_rss_gib_set_up": setup_peak,
    }


def part_stage1_infer(reps: int, quick: bool) -> dict:
    import torch

    from lmrc.stage1.encoder import load_encoder
    from lmrc.stage1.features import collate, featurize_all
    from lmrc.stage1.inference import infer_logits
    from lmrc.stage1.losses import build_loss
    from lmrc.stage1.model import Stage1Model

    rel, docs = _docs(16 if quick else 32)
    encoder, tok = load_encoder("minilm")
    model = Stage1Model(encoder, build_loss("atl").num_logits(len(rel))).eval()
    feats = featurize_all(docs, tok, rel)
    pairs = sum(len(f.hts) for f in feats)

    @torch.no_grad()
    def file_order():
        for i in range(0, len(feats), 8):
            b = collate(feats[i : i + 8])
            model(b["input_ids"], b["attention_mask"], b["entity_pos"], b["hts"])

    infer_logits(model, feats[:8], 8, "cpu")  # warm-up
    grouped, plain = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        infer_logits(model, feats, 8, "cpu")
        t1 = time.perf_counter()
        file_order()
        t2 = time.perf_counter()
        grouped.append(t1 - t0)
        plain.append(t2 - t1)
    g, p = statistics.median(grouped), statistics.median(plain)
    return {
        "documents": len(feats),
        "batch_size": 8,
        "documents_per_s_length_grouped": round(len(feats) / g, 2),
        "documents_per_s_file_order": round(len(feats) / p, 2),
        "pairs_per_s_length_grouped": round(pairs / g, 1),
        "length_grouped_speedup": round(p / g, 3),
        "peak_rss_gib": _peak_gib(),
    }


# ------------------------------------------------------------------------------------------------- stage 2


def _rc_prompts(n: int, max_len: int):
    from lmrc.stage2.modeling import load_tokenizer, resolve_model_path
    from lmrc.stage2.prompts import PromptEncoder, plan_prompts
    from lmrc.stage2.templates import load_template

    rel, docs = _docs(n)
    path = resolve_model_path("smollm2-135m")
    tok = load_tokenizer(path)
    enc = PromptEncoder(tok)
    prompts = []
    for d in docs:
        (p, *_) = plan_prompts(d, rel, sorted(d.relations_by_pair()) or d.pairs()[:4], load_template("rc"),
                               enc.count_tokens, enc.max_context(4096))  # fmt: skip
        prompts.append(enc.encode_prompt(p.text)[-max_len:])
    return path, tok, prompts


def part_stage2_generate(reps: int, quick: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lmrc.stage2.modeling import resolve_dtype

    new_tokens = 32
    path, tok, prompts = _rc_prompts(16, 256 if quick else 512)
    dtype = resolve_dtype("auto", torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    out: dict = {"dtype": str(dtype).replace("torch.", ""), "new_tokens": new_tokens,
                 "prompt_tokens": len(prompts[0])}  # fmt: skip

    def run(batch):
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(batch):
            ids[i, width - len(x) :] = torch.tensor(x)
            mask[i, width - len(x) :] = 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        return len(batch) * new_tokens / (time.perf_counter() - t0)

    run(prompts[:1])  # warm-up
    for bs in (1, 4, 8, 16):
        out[f"tokens_per_s_batch_{bs}"] = _median([run(prompts[:bs]) for _ in range(reps)])
    out["batch8_over_batch1"] = round(out["tokens_per_s_batch_8"] / out["tokens_per_s_batch_1"], 2)
    out["peak_rss_gib"] = _peak_gib()
    return out


def part_stage2_per_doc(reps: int, quick: bool) -> dict:
    """What one document costs the LLM: the base model (no adapter: the cost does not depend on the weights)
    answers the real prompts of the shortest dev_50 documents, each prompt with the answer budget predict gives
    it, capped at `cap` new tokens so that the part stays short (the cap is reported)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmrc.stage2.config import GenerationConfig
    from lmrc.stage2.generate import HFGenerator, answer_budget
    from lmrc.stage2.modeling import load_tokenizer, resolve_dtype, resolve_model_path
    from lmrc.stage2.prompts import PromptEncoder, plan_prompts
    from lmrc.stage2.templates import load_template

    rel, docs = _docs(50)
    docs = sorted(docs, key=lambda d: len(d.pairs()))[: 1 if quick else 2]
    reps = min(reps, 2)  # float32 CPUs take minutes per repetition; token counts do not vary
    cap = 8 if quick else 24
    path = resolve_model_path("smollm2-135m")
    tok = load_tokenizer(path)
    enc = PromptEncoder(tok)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype("auto", torch.device("cpu")))
    model.eval()
    out: dict = {"documents": len(docs), "new_token_cap_per_prompt": cap}
    gcfg = GenerationConfig(batch_size=8)
    for mode, max_pairs in (("direct", 18), ("rc", None)):
        prompts, groups, budgets = [], [], []
        for g, d in enumerate(docs):
            pairs = d.pairs() if mode == "direct" else sorted(d.relations_by_pair())
            for p in plan_prompts(d, rel, pairs, load_template(mode), enc.count_tokens, enc.max_context(2048),
                                  max_pairs=max_pairs):  # fmt: skip
                ids = enc.encode_prompt(p.text)
                prompts.append(ids)
                groups.append(g)
                budgets.append(min(cap, answer_budget(len(p.pairs), gcfg, len(ids), 2048)))
        n = len(docs)
        out[f"{mode}_prompts_per_doc"] = round(len(prompts) / n, 1)
        out[f"{mode}_prompt_tokens_per_doc"] = round(sum(map(len, prompts)) / n)
        for cached in (False, True) if mode == "direct" else (True,):
            gen = HFGenerator(model, tok, dataclasses.replace(gcfg, prefix_cache=cached))
            times, res = [], None
            for _ in range(reps):
                t0 = time.perf_counter()
                res = gen.generate(prompts, budgets, groups=groups)
                times.append(time.perf_counter() - t0)
            tag = f"{mode}_prefix_cache" if cached and mode == "direct" else mode
            out[f"{tag}_prefill_tokens_per_doc"] = round(sum(r.prefill_tokens for r in res) / n)
            out[f"{tag}_generated_tokens_per_doc"] = round(sum(r.n_tokens for r in res) / n)
            out[f"{tag}_seconds_per_doc"] = round(_median(times) / n, 2)
    out["direct_prefill_reduction"] = round(
        out["direct_prefill_tokens_per_doc"] / out["direct_prefix_cache_prefill_tokens_per_doc"], 2
    )
    out["direct_prefix_cache_speedup"] = round(
        out["direct_seconds_per_doc"] / out["direct_prefix_cache_seconds_per_doc"], 2
    )
    out["peak_rss_gib"] = _peak_gib()
    return out


def part_stage2_lora(reps: int, quick: bool, checkpointing: bool = False) -> dict:
    import torch

    from lmrc.stage2.config import load_stage2_config
    from lmrc.stage2.examples import ExampleBuilder, ExampleStats
    from lmrc.stage2.modeling import load_base_model, load_tokenizer, resolve_model_path, wrap_lora
    from lmrc.stage2.prompts import PromptEncoder
    from lmrc.stage2.templates import load_template
    from lmrc.stage2.trainer import answer_loss_sum, collate

    rel, docs = _docs(4)
    path = resolve_model_path("smollm2-135m")
    tok = load_tokenizer(path)
    cfg = load_stage2_config(None, [f"train.gradient_checkpointing={str(checkpointing).lower()}"])
    builder = ExampleBuilder(rel, load_template("rc"), PromptEncoder(tok), 1024 if quick else 2048)
    examples = [
        e for d in docs for e in builder.document_examples(d, sorted(d.relations_by_pair()), ExampleStats())
    ]
    batch = collate(examples[:4], tok.pad_token_id)
    model = wrap_lora(load_base_model(cfg, path, torch.device("cpu"), training=True), cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n_tokens = int(batch["attention_mask"].sum())
    times = []
    for k in range(reps + 1):
        t0 = time.perf_counter()
        answer_loss_sum(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return {
        "gradient_checkpointing": checkpointing,
        "sequences": int(batch["input_ids"].shape[0]),
        "tokens_per_step": n_tokens,
        "tokens_per_s": round(n_tokens / statistics.median(times), 1),
        "peak_rss_gib": _peak_gib(),
    }


def part_stage2_lora_checkpointing(reps: int, quick: bool) -> dict:
    return part_stage2_lora(reps, quick, checkpointing=True)


# ------------------------------------------------------------------------------------------------- predict


def part_predict_memory(reps: int, quick: bool) -> dict:
    """`lmrc predict` (stage1-only, a tiny stage-1 model) on 50 and on 500 documents, each in its own process."""
    sys.path.insert(0, str(REPO / "tests"))
    from stage1_run_helpers import save_tiny_bert, tiny_config, write_docs

    from lmrc.stage1.train import train

    rel, docs = _docs(50)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_file = write_docs(root / "train.json", docs[:4])
        cfg = tiny_config(save_tiny_bert(root / "bert"), train_file, None, _data_path("rel_info.json"), root / "s1",
                          "train.epochs=1")  # fmt: skip
        ckpt = train(cfg).best_dir
        raw = json.loads(_data_path("dev_50.json").read_text())
        out = {}
        for n in (50, 500):
            many = [dict(raw[i % len(raw)], title=f"{raw[i % len(raw)]['title']} #{i}") for i in range(n)]
            path = root / f"docs{n}.json"
            path.write_text(json.dumps(many))
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lmrc.cli", "-q", "predict", "--input", str(path), "--output",
                            str(root / f"r{n}.json"), "--stage1", str(ckpt)], check=True)  # fmt: skip
            summary = json.loads((root / f"r{n}.summary.json").read_text())
            out[f"peak_rss_gib_{n}_documents"] = summary["peak_rss_gib"]
            out[f"seconds_{n}_documents"] = round(time.perf_counter() - t0, 2)
        out["peak_ratio_500_over_50"] = round(
            out["peak_rss_gib_500_documents"] / out["peak_rss_gib_50_documents"], 3
        )
    return out


# ---------------------------------------------------------------------------------------------------- driver


def machine_kind(info: dict) -> str:
    bf16 = "bf16" if info["cpu_native_bf16"] else "nobf16"
    gpu = "-" + info["cuda"].replace(" ", "_") if info.get("cuda") else ""
    return f"{info['cpu_capability'].lower()}-{bf16}-{info['cores']}cores{gpu}"


def render(results_dir: Path) -> str:
    lines = [BEGIN, "", "Written by `make bench` (benchmarks/bench.py); one table per machine kind.", ""]
    for path in sorted(results_dir.glob("*.json")):
        r = json.loads(path.read_text())
        m = r["machine"]
        lines += [f"### {path.stem}", "", f"{m['cpu']}, {m['cpu_capability']}, "
                  f"{'native' if m['cpu_native_bf16'] else 'no native'} bf16, {m['cores']} cores, torch "
                  f"{m['torch']}; {r['date']}; `{r['command']}` (median of {r['reps']}, load average "
                  f"{r['load_average']})", "", "| part | measure | value |", "|---|---|---|"]  # fmt: skip
        for part, values in r["parts"].items():
            for k, v in values.items():
                lines.append(f"| {part} | {k} | {v} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_performance(results_dir: Path, doc: Path) -> None:
    from lmrc.io import atomic_write_text

    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Performance\n"
    block = render(results_dir)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## Benchmarks (`make bench`)\n\n" + block + "\n"
    atomic_write_text(doc, text)


def merge_record(old: dict, new: dict) -> dict:
    """A run of some parts keeps the machine's other parts from its last run; the new parts say when they were
    measured, as their run's date and load differ from the record's header."""
    if set(new["parts"]) >= set(ALL_PARTS):
        return new
    parts = {name: {**values, "measured": f"{new['date']}, load {new['load_average']}"}
             for name, values in new["parts"].items()}  # fmt: skip
    return {**old, "parts": {**old["parts"], **parts}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(ALL_PARTS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="shorter inputs (a smoke run)")
    p.add_argument(
        "--precision", default="auto", help="stage-1 precision: auto (default), no (float32), bf16"
    )
    p.add_argument("--part", help=argparse.SUPPRESS)  # a child process runs one part
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "PERFORMANCE.md")
    args = p.parse_args(argv)
    os.environ["LMRC_BENCH_PRECISION"] = args.precision  # children inherit it
    if args.part:
        result = globals()[f"part_{args.part}"](args.reps, args.quick)
        args.out.write_text(json.dumps(result))
        return 0

    from lmrc.machine.hardware import describe, describe_line

    info = describe()
    print(f"machine: {describe_line()}", flush=True)
    parts = {}
    for name in args.parts.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--part", name, "--reps", str(args.reps), "--out", tmp.name]
            subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
            parts[name] = json.loads(Path(tmp.name).read_text())
            print(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(parts[name])}", flush=True)
    record = {
        "machine": info,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/bench.py" + (" --quick" if args.quick else "") + f" --reps {args.reps}",
        "reps": args.reps,
        "load_average": round(os.getloadavg()[0], 2),
        "parts": parts,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{machine_kind(info)}.json"
    if out.is_file():
        record = merge_record(json.loads(out.read_text()), record)
    out.write_text(json.dumps(record, indent=2) + "\n")
    write_performance(args.results, args.doc)
    print(f"results: {out}; {args.doc} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())

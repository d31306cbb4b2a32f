"""Stage-2 throughput on real prompts: LoRA training tokens/s and generation tokens/s, per weight dtype.

    python benchmarks/stage2_throughput.py [--model smollm2-135m] [--prompts 2] [--dtypes bfloat16,float32]

Builds real rc training examples (gold pairs of the first documents of `$LMRC_DATA_DIR/redocred/dev_50.json`, or
--input) with the shipped template, then per dtype:
- training: forward + backward + AdamW step of the LoRA model, one example per step, after one warm-up step;
  tokens/s counts prompt + answer tokens (median and best step: on a shared CPU the best is the cleaner number);
- generation: greedy decoding of exactly --gen-tokens new tokens for the prompts as one left-padded batch
  (adapter-free base model: a merged adapter costs the same); per-token timestamps separate prefill (time to the
  first token) from decoding within the one call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, help="DocRED file (default $LMRC_DATA_DIR/redocred/dev_50.json)")
    p.add_argument("--rel-info", type=Path, help="default: rel_info.json next to the input")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=2, help="number of real training prompts")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument(
        "--train-steps", type=int, default=2, help="timed training steps per dtype (after a warm-up)"
    )
    p.add_argument("--gen-tokens", type=int, default=32, help="new tokens generated per prompt")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)

    import torch

    from lmrc.data.docred import load_documents
    from lmrc.data.relations import load_relations
    from lmrc.stage2.config import load_stage2_config
    from lmrc.stage2.examples import ExampleBuilder, ExampleStats
    from lmrc.stage2.modeling import load_tokenizer, resolve_model_path
    from lmrc.stage2.prompts import PromptEncoder
    from lmrc.stage2.templates import load_template

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.input
    if path is None:
        if not os.environ.get("LMRC_DATA_DIR"):
            print("set LMRC_DATA_DIR or pass --input", file=sys.stderr)
            return 2
        path = Path(os.environ["LMRC_DATA_DIR"]) / "redocred" / "dev_50.json"
    relations = load_relations(args.rel_info or path.parent / "rel_info.json")
    docs = load_documents(path, relations)

    model_path = resolve_model_path(args.model)
    tok = load_tokenizer(model_path)
    encoder = PromptEncoder(tok)
    builder = ExampleBuilder(relations, load_template("rc"), encoder, args.max_seq_len)
    examples = []
    for doc in docs:
        examples.extend(builder.document_examples(doc, sorted(doc.relations_by_pair()), ExampleStats()))
        if len(examples) >= args.prompts:
            break
    examples = examples[: args.prompts]
    lengths = [len(e) for e in examples]
    print(
        f"{args.model}: {len(examples)} prompts, {sum(lengths)} tokens ({min(lengths)}-{max(lengths)} each), "
        f"{torch.get_num_threads()} threads"
    )

    cfg = load_stage2_config(None, [f"model={args.model}"])
    rows = []
    for name in args.dtypes.split(","):
        row = measure(name, model_path, cfg, tok, examples, args.train_steps, args.gen_tokens)
        rows.append(row)
        print(
            f"{name:>9}: train {row['train_tokens_per_s_median']:7.1f} tok/s (median; best "
            f"{row['train_tokens_per_s_best']:.1f}) | prefill {row['prefill_s']:6.2f} s | "
            f"decode {row['decode_tokens_per_s']:6.2f} tok/s (batch {len(examples)}) | "
            f"generation incl. prefill {row['generation_tokens_per_s']:6.2f} tok/s"
        )
    if args.out:
        args.out.write_text(
            json.dumps({"model": args.model, "prompt_lengths": lengths, "rows": rows}, indent=2)
        )
    return 0


def measure(name, model_path, cfg, tok, examples, train_steps: int, gen_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    from lmrc.stage2.examples import IGNORE_INDEX
    from lmrc.stage2.modeling import wrap_lora
    from lmrc.stage2.trainer import answer_loss_sum, collate

    dtype = getattr(torch, name)
    model = wrap_lora(AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype), cfg)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)

    def step(ex) -> None:
        loss = answer_loss_sum(model, collate([ex], tok.pad_token_id)) / ex.n_answer_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(examples[0])  # warm-up (kernel selection, allocations)
    rates = []
    for k in range(train_steps):
        ex = examples[k % len(examples)]
        t0 = time.perf_counter()
        step(ex)
        rates.append(len(ex) / (time.perf_counter() - t0))

    base = model.get_base_model().eval()
    prompts = [e.input_ids[: e.labels.count(IGNORE_INDEX)] for e in examples]
    width = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(prompts):  # left padding, as in lmrc.stage2.generate
        ids[i, width - len(x) :] = torch.tensor(x)
        mask[i, width - len(x) :] = 1
    stamps: list[float] = []

    class Clock(StoppingCriteria):
        """Called once per generated token: timestamps split prefill from decoding within one call."""

        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    start = time.perf_counter()
    with torch.inference_mode():
        base.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=gen_tokens,
            min_new_tokens=gen_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            stopping_criteria=StoppingCriteriaList([Clock()]),
        )
    prefill = stamps[0] - start
    decode = (len(stamps) - 1) * len(prompts) / max(stamps[-1] - stamps[0], 1e-9)
    return {
        "dtype": name,
        "train_tokens_per_s_median": round(statistics.median(rates), 1),
        "train_tokens_per_s_best": round(max(rates), 1),
        "prefill_s": round(prefill, 2),
        "decode_tokens_per_s": round(decode, 2),
        "generation_tokens_per_s": round(len(stamps) * len(prompts) / (stamps[-1] - start), 2),
    }


if __name__ == "__main__":
    sys.exit(main())

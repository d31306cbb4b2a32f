"""Stage-1 training throughput: documents per second for forward + backward of the real model on real documents.

    python benchmarks/stage1_throughput.py --docs 16 --batch-sizes 1,4 --threads 1,2 --precision fp32,bf16
        [--encoder minilm] [--loss atl]

Reads `$LMRC_DATA_DIR/redocred/dev_50.json` (or --input). Prints one row per (threads, batch size): seconds per
batch and documents per second, measured after one warm-up batch; the optimizer step is not included.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, help="DocRED file (default $LMRC_DATA_DIR/redocred/dev_50.json)")
    p.add_argument("--rel-info", type=Path, help="default: rel_info.json next to the input")
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--loss", default="atl")
    p.add_argument("--docs", type=int, default=16, help="number of documents (file order)")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--threads", default=str(os.cpu_count() or 1), help="comma-separated torch thread counts")
    p.add_argument(
        "--precision", default="fp32,bf16", help="fp32 and/or bf16 (autocast, as train.mixed_precision)"
    )
    args = p.parse_args(argv)

    import torch

    from lmrc.data.docred import load_documents
    from lmrc.data.relations import load_relations
    from lmrc.stage1.encoder import load_encoder
    from lmrc.stage1.features import collate, featurize_all, length_grouped_batches
    from lmrc.stage1.losses import build_loss
    from lmrc.stage1.model import Stage1Model

    path = args.input
    if path is None:
        if not os.environ.get("LMRC_DATA_DIR"):
            sys.exit("set LMRC_DATA_DIR or pass --input")
        path = Path(os.environ["LMRC_DATA_DIR"]) / "redocred" / "dev_50.json"
    relations = load_relations(args.rel_info or path.parent / "rel_info.json")
    docs = load_documents(path, relations)[: args.docs]
    encoder, tokenizer = load_encoder(args.encoder)
    loss = build_loss(args.loss)
    model = Stage1Model(encoder, loss.num_logits(len(relations))).train()
    features = featurize_all(docs, tokenizer, relations)
    n_tokens = sum(len(f.input_ids) for f in features)
    n_pairs = sum(len(f.hts) for f in features)
    print(
        f"{args.encoder} / {args.loss}: {len(docs)} documents, {n_tokens / len(docs):.0f} word-pieces and "
        f"{n_pairs / len(docs):.0f} pairs per document on average"
    )
    print(f"{'precision':>9} {'threads':>7} {'batch':>5} {'s/batch':>8} {'docs/s':>7}")
    for precision, threads, bs in (
        (pr, int(t), int(b))
        for pr in args.precision.split(",")
        for t in args.threads.split(",")
        for b in args.batch_sizes.split(",")
    ):
        torch.set_num_threads(threads)
        batches = length_grouped_batches(features, bs, seed=0)
        times = []
        for i, batch in enumerate([batches[0]] + batches):  # the first one warms up
            inputs = collate([features[j] for j in batch])
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(
                    inputs["input_ids"], inputs["attention_mask"], inputs["entity_pos"], inputs["hts"]
                )
            loss(logits.float(), inputs["labels"]).backward()
            model.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - start)
        total = sum(times)
        print(f"{precision:>9} {threads:>7} {bs:>5} {total / len(times):>8.3f} {len(features) / total:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

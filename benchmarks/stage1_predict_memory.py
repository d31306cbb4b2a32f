"""Stage-1 prediction memory on one very long document: the first N documents of a DocRED file joined into one.

    python benchmarks/stage1_predict_memory.py build --out /tmp/long.json [--input train_450.json] [--docs 20]
    python benchmarks/stage1_predict_memory.py run --stage1 CKPT --input /tmp/long.json --output /tmp/long.result.json \
        [-- any other `lmrc predict` arguments, e.g. --threshold -2]

`build` concatenates the documents' `sents`, offsets every mention's `sent_id` and every label's `h`/`t` (and
evidence), and concatenates the `vertexSet`s. The 20 first documents of `train_450.json` give the 433-entity
document of issue 26 (186,856 ordered pairs, ~5,500 word pieces); those of `dev_50.json` (the default) give 415
entities and 171,810 pairs, the long document of docs/PERFORMANCE.md's issue-18 section.
`run` runs `lmrc predict --mode stage1-only` on it in a child process and prints the child's peak RSS (the child's
ru_maxrss from wait4, as `/usr/bin/time -v` reports it), the wall time, the predictions and the
result file's size: the figures of docs/PERFORMANCE.md's "Stage-1 prediction memory" section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def join_documents(raws: list[dict], title: str) -> dict:
    """One DocRED document made of `raws` in order: sentences concatenated, sentence ids and entity indices of
    the later documents offset by what precedes them."""
    sents: list[list[str]] = []
    vertex_set: list[list[dict]] = []
    labels: list[dict] = []
    for raw in raws:
        s_off, e_off = len(sents), len(vertex_set)
        sents.extend(raw["sents"])
        vertex_set.extend(
            [{**m, "sent_id": m["sent_id"] + s_off} for m in entity] for entity in raw["vertexSet"]
        )
        for lab in raw.get("labels", ()):
            labels.append(
                {
                    **lab,
                    "h": lab["h"] + e_off,
                    "t": lab["t"] + e_off,
                    "evidence": [e + s_off for e in lab.get("evidence", ())],
                }
            )
    return {"title": title, "sents": sents, "vertexSet": vertex_set, "labels": labels}


def build(args: argparse.Namespace) -> int:
    path = args.input
    if path is None:
        if not os.environ.get("LMRC_DATA_DIR"):
            sys.exit("set LMRC_DATA_DIR or pass --input")
        path = Path(os.environ["LMRC_DATA_DIR"]) / "redocred" / "dev_50.json"
    raws = json.loads(Path(path).read_text(encoding="utf-8"))[: args.docs]
    doc = join_documents(raws, f"{len(raws)} documents of {Path(path).name}, joined")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([doc], ensure_ascii=False) + "\n", encoding="utf-8")
    n = len(doc["vertexSet"])
    print(
        f"{args.out}: {len(doc['sents'])} sentences, {n} entities, {n * (n - 1)} ordered pairs, "
        f"{len(doc['labels'])} facts"
    )
    return 0


def run(args: argparse.Namespace, extra: list[str]) -> int:
    lmrc = Path(sys.executable).with_name("lmrc")
    cmd = [
        str(lmrc),
        "predict",
        "--mode",
        "stage1-only",
        "--stage1",
        str(args.stage1),
        "--input",
        str(args.input),
        "--output",
        str(args.output),
        "--overwrite",
        *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    peak_gib = usage.ru_maxrss / 2**20  # Linux: KiB
    line = {"exit": rc, "wall_s": round(wall, 1), "peak_rss_gib": round(peak_gib, 3)}
    if rc == 0:
        summary = json.loads(args.output.with_name(args.output.stem + ".summary.json").read_text())
        line.update(
            {
                "predictions": summary["predictions"],
                "candidates": summary.get("candidates", {}).get("candidates"),
                "pairs": summary.get("candidates", {}).get("pairs"),
                "result_mb": round(args.output.stat().st_size / 1e6, 1),
                "pipeline_peak_rss_gib": summary.get("peak_rss_gib"),
            }
        )
    print(json.dumps(line), flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the joined document")
    b.add_argument("--input", type=Path, help="DocRED file (default $LMRC_DATA_DIR/redocred/dev_50.json)")
    b.add_argument("--docs", type=int, default=20, help="how many documents to join (file order)")
    b.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="lmrc predict --mode stage1-only on it, with the child's peak RSS")
    r.add_argument("--stage1", type=Path, required=True)
    r.add_argument("--input", type=Path, required=True)
    r.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    return build(args) if args.command == "build" else run(args, extra)


if __name__ == "__main__":
    sys.exit(main())

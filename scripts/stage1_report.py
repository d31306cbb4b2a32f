"""Score every finished stage-1 run on the report set and print the markdown table of docs/RESULTS.md.

    python scripts/stage1_report.py RUNS_DIR [--gold dev_50.json] [--tune data/splits/train_450_split1.json]
        [--recall-heads bce,atgl] [--json OUT]

For each run folder (one per head / setting, as scripts/stage1_experiments.sh writes them) it predicts the report
documents with `best/`, at the head's default threshold and, for the --recall-heads, at recall target 0.95
calibrated on the tuning split (never on the report set). Training time and peak memory come from the
`/usr/bin/time -v` record next to each run (summed over resumed pieces; peak = the largest).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path


def time_record(path: Path) -> tuple[float | None, float | None]:
    """(wall seconds summed over pieces, peak RSS in GiB) from a `time -v` file."""
    if not path.exists():
        return None, None
    text = path.read_text()
    wall = 0.0
    for m in re.finditer(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text):
        parts = [float(x) for x in m.group(1).split(":")]
        secs = 0.0
        for p in parts:
            secs = secs * 60 + p
        wall += secs
    rss = [int(x) for x in re.findall(r"Maximum resident set size \(kbytes\): (\d+)", text)]
    return (wall or None), (max(rss) / 2**20 if rss else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path)
    data = Path(os.environ.get("LMRC_DATA_DIR", "../shared/data")) / "redocred"
    p.add_argument("--gold", type=Path, default=data / "dev_50.json")
    p.add_argument("--tune", type=Path, default=Path("data/splits/train_450_split1.json"))
    p.add_argument("--recall-heads", default="bce,atgl")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from lmrc.io import atomic_write_json, read_json
    from lmrc.stage1.config import CandidateSettings
    from lmrc.stage1.predict import predict

    recall_heads = set(args.recall_heads.split(","))
    rows = []
    for run in sorted(d for d in args.runs.iterdir() if (d / "best").is_dir()):
        cfg_head = read_json(run / "best" / "stage1.json").get("loss", {}).get("name", "?")
        metrics_lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        wall, rss = time_record(run.parent / f"{run.name}.time.txt")
        settings = [("default", CandidateSettings())]
        if cfg_head in recall_heads or run.name.split("-")[0] in recall_heads:
            settings.append(("recall 0.95", CandidateSettings(recall_target=0.95, tune=str(args.tune))))
        if (
            cfg_head == "amtl"
        ):  # AMTL inference: Eq. 2's combined threshold (default) and the authors' raw one
            settings.append(("raw thresholds", CandidateSettings(head_params={"threshold_mode": "raw"})))
        for label, rule in settings:
            tag = label.replace(" ", "_")
            res = predict(
                run / "best",
                args.gold,
                run / f"report.{tag}.cands.json",
                rule,
                relations_output=(run / f"report.{tag}.result.json") if cfg_head != "bce" else None,
            )
            row = {
                "run": run.name,
                "head": cfg_head,
                "threshold": label,
                "threshold_value": res.threshold,
                "epochs_evaluated": len(metrics_lines),
                "train_wall_s": wall,
                "peak_rss_gib": rss,
                "cand_precision": res.report.precision,
                "cand_recall": res.report.recall,
                "cand_f1": res.report.f1,
                "reduction": res.report.reduction,
            }
            # A calibrated candidate threshold changes the candidates only; relations follow the head's own rule.
            if res.relation_metrics is not None and rule.recall_target is None:
                s = res.relation_metrics.summary()
                row.update({k: s[k] for k in ("precision", "recall", "f1", "ign_f1")})
            rows.append(row)
            print(f"{run.name} [{label}] done", file=sys.stderr)

    def pct(x):
        return "–" if x is None else f"{100 * x:.2f}"

    print(
        "| run | head | threshold | P | R | F1 | Ign F1 | cand. P | cand. R | reduction | train time | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = "–" if r["train_wall_s"] is None else f"{r['train_wall_s'] / 60:.1f} min"
        m = "–" if r["peak_rss_gib"] is None else f"{r['peak_rss_gib']:.1f} GiB"
        print(
            f"| {r['run']} | {r['head']} | {r['threshold']} | {pct(r.get('precision'))} | {pct(r.get('recall'))} | "
            f"{pct(r.get('f1'))} | {pct(r.get('ign_f1'))} | {pct(r['cand_precision'])} | {pct(r['cand_recall'])} | "
            f"{pct(r['reduction'])} | {t} | {m} |"
        )
    if args.json:
        atomic_write_json(args.json, rows, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

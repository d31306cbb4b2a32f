"""The table of scripts/small_corpus_experiments.sh: per run (corpus, head), the held-out F1 at every evaluation
(every 100 optimizer steps), read from each run's metrics.jsonl, and whether the run's end check warned that the
model had learned nothing (train_summary.json).

    python scripts/small_corpus_report.py [RUNS_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/small-corpus")
    rows, steps = [], set()
    for run in sorted(p for p in runs.iterdir() if (p / "metrics.jsonl").is_file()):
        f1 = {}
        for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            value = rec.get("tune", {}).get("f1", rec.get("value"))
            if value is not None:
                f1[rec["step"]] = 100 * value
        steps |= set(f1)
        summary = run / "train_summary.json"
        warned = bool(json.loads(summary.read_text()).get("warnings")) if summary.is_file() else None
        rows.append((run.name, f1, warned))
    order = sorted(steps)
    print("| run | " + " | ".join(f"F1 @ {s}" for s in order) + " | learned nothing (end check) |")
    print("|---" * (len(order) + 2) + "|")
    for name, f1, warned in rows:
        cells = [f"{f1[s]:.2f}" if s in f1 else "" for s in order]
        flag = "running" if warned is None else "yes" if warned else "no"
        print(f"| {name} | " + " | ".join(cells) + f" | {flag} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`lmrc show` on 500 documents: the page's size, the time to write it, and in headless Chromium the time to load it
and to open a document (what docs/PERFORMANCE.md "lmrc show" reports).

    python benchmarks/show_page.py [--docs FILE ...] [--out DIR]

The documents are Re-DocRED's train_450.json and dev_50.json ($LMRC_DATA_DIR/redocred: 500 labelled documents). The
"method" is made from the gold facts (every second fact right, one wrong relation per document), so that the page
holds as many rows as a useful model's would; no model runs here. Needs chromium + chromedriver (make setup).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from browser_helpers import browser, open_page  # noqa: E402

from lmrc.data.docred import document_to_raw, load_documents  # noqa: E402
from lmrc.machine.hardware import describe_line  # noqa: E402
from lmrc.show import collect, page  # noqa: E402


def _method(docs) -> list[dict]:
    preds = []
    for d in docs:
        facts = list(d.facts or ())
        preds += [{"title": d.title, "h_idx": f.h, "t_idx": f.t, "r": f.r} for f in facts[::2]]
        if facts:
            preds.append({"title": d.title, "h_idx": facts[0].t, "t_idx": facts[0].h, "r": "P17"})
    return preds


def main() -> int:
    data = Path(os.environ.get("LMRC_DATA_DIR", "../shared/data")) / "redocred"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", nargs="+", default=[str(data / "train_450.json"), str(data / "dev_50.json")])
    ap.add_argument("--out", default="runs/bench-show")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = [d for f in args.docs for d in load_documents(f)]
    docs_file, result = out / "docs.json", out / "result.json"
    docs_file.write_text(json.dumps([document_to_raw(d) for d in docs]), encoding="utf-8")
    result.write_text(json.dumps(_method(docs)), encoding="utf-8")
    rel_info = data / "rel_info.json"

    t0 = time.perf_counter()
    source = collect.from_predict_run(result, docs_file, rel_info=rel_info)
    html_path = page.write_page(collect.payload(source), out / "page.html")
    write_s = time.perf_counter() - t0
    loads, opens = [], []
    with browser() as driver:
        for _ in range(args.reps):
            open_page(driver, html_path)
            loads.append(int(driver.execute_script("return Number(document.body.dataset.loadMs)")))
        for i in (10, 200, 499):
            ms = driver.execute_script(
                "const t = performance.now(); document.querySelector('#doc-list li[data-doc=\"' + arguments[0]"
                " + '\"]').click(); return performance.now() - t;",
                min(i, len(docs) - 1),
            )
            opens.append(ms)
    report = {
        "machine": describe_line(),
        "documents": len(docs),
        "facts": sum(len(d.facts or ()) for d in docs),
        "page_mib": round(html_path.stat().st_size / 2**20, 2),
        "write_s": round(write_s, 2),
        "load_ms_median": statistics.median(loads),
        "load_ms": loads,
        "open_document_ms": [round(x, 1) for x in opens],
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

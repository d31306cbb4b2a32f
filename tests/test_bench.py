"""The benchmark driver's bookkeeping (the measurements themselves run in `make bench`, never in tests)."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record(parts: dict, date: str = "2026-12-01", load: float = 1.0) -> dict:
    machine = {
        "cpu": "Test CPU",
        "cpu_capability": "AVX2",
        "cpu_native_bf16": False,
        "cores": 2,
        "torch": "x",
    }
    return {"machine": machine, "date": date, "command": "python benchmarks/bench.py", "reps": 3,
            "load_average": load, "parts": parts}  # fmt: skip


def test_a_partial_run_keeps_the_other_parts_and_dates_its_own():
    bench = _bench()
    old = _record({name: {"value": 1} for name in bench.ALL_PARTS})
    new = _record({"stage2_per_doc": {"value": 2}}, date="2026-12-02", load=0.5)
    merged = bench.merge_record(old, new)
    assert merged["date"] == "2026-12-01"  # the header is the full run's
    assert merged["parts"]["stage1_train"] == {"value": 1}
    assert merged["parts"]["stage2_per_doc"] == {"value": 2, "measured": "2026-12-02, load 0.5"}
    full = _record({name: {"value": 3} for name in bench.ALL_PARTS}, date="2026-12-03")
    assert bench.merge_record(merged, full) == full  # a full run replaces the record


def test_performance_md_is_rewritten_between_the_markers_only(tmp_path):
    bench = _bench()
    results = tmp_path / "results"
    results.mkdir()
    (results / "avx2-nobf16-2cores.json").write_text(
        json.dumps(_record({"stage1_train": {"documents_per_s": 1.5}}))
    )
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(f"# Performance\n\nkept above\n\n{bench.BEGIN}\nold table\n{bench.END}\n\nkept below\n")
    bench.write_performance(results, doc)
    text = doc.read_text()
    assert "old table" not in text and "kept above" in text and "kept below" in text
    assert "| stage1_train | documents_per_s | 1.5 |" in text
    assert "### avx2-nobf16-2cores" in text and "Test CPU, AVX2, no native bf16" in text

"""`lmrc data validate | stats | split` end to end, on the shared files and broken copies of them."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lmrc.cli import main
from lmrc.data.split import part_sizes, split_indices


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def load(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --- validate ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sub", "name"),
    [("redocred", "dev_50"), ("redocred", "train_450"), ("cdr", "train"), ("cdr", "dev"), ("cdr", "test")],
)
def test_validate_passes_the_shared_files(capsys, data_dir, sub, name):
    path = data_dir / sub / f"{name}.json"
    code, out, _ = run(capsys, "data", "validate", path, "--rel-info", data_dir / sub / "rel_info.json")
    n_docs = len(load(path))
    assert code == 0
    assert out.splitlines() == [f"{path}: OK: {n_docs} documents, 0 errors, 0 warnings"]


def test_validate_lists_each_problem_of_a_broken_copy(capsys, redocred_dir, tmp_path):
    raw = load(redocred_dir / "dev_50.json")
    raw[3]["vertexSet"][2][0]["sent_id"] = 99
    raw[7]["labels"][4]["r"] = "P9999"
    raw[7]["labels"][5]["t"] = raw[7]["labels"][5]["h"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    code, out, _ = run(capsys, "data", "validate", path, "--rel-info", redocred_dir / "rel_info.json")
    t3, t7 = raw[3]["title"], raw[7]["title"]
    n3 = len(raw[3]["sents"])
    assert code == 1
    assert out.splitlines() == [
        f'{path}: document 3 ("{t3}"): vertexSet[2][0].sent_id: 99 out of range (document has {n3} sentences)',
        f"{path}: document 7 (\"{t7}\"): labels[4].r: unknown relation id 'P9999' (not in the relation inventory)",
        f'{path}: document 7 ("{t7}"): labels[5]: h and t are the same entity ({raw[7]["labels"][5]["h"]})',
        f"{path}: FAILED: 50 documents, 3 errors, 0 warnings",
    ]


def test_validate_without_rel_info_skips_relation_ids_and_says_so(capsys, redocred_dir, tmp_path):
    raw = load(redocred_dir / "dev_50.json")
    raw[0]["labels"][0]["r"] = "P9999"
    path = tmp_path / "unknown_rel.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    code, out, _ = run(capsys, "data", "validate", path)
    assert code == 0
    assert "(relation ids not checked: pass --rel-info rel_info.json)" in out


def test_duplicate_facts_warn_with_exit_0_and_fail_with_strict(capsys, redocred_dir, tmp_path):
    raw = load(redocred_dir / "dev_50.json")
    dup = dict(raw[2]["labels"][0])
    raw[2]["labels"].append(dup)
    n = len(raw[2]["labels"]) - 1
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    line = (
        f'{path}: document 2 ("{raw[2]["title"]}"): labels[{n}]: warning: duplicate fact '
        f"(h={dup['h']}, t={dup['t']}, r={dup['r']}; also labels[0])"
    )
    code, out, _ = run(capsys, "data", "validate", path, "--rel-info", redocred_dir / "rel_info.json")
    assert code == 0
    assert out.splitlines() == [line, f"{path}: OK: 50 documents, 0 errors, 1 warnings"]
    code, out, _ = run(capsys, "data", "validate", path, "--strict")
    assert code == 1
    assert out.splitlines()[:2] == [line, f"{path}: FAILED: 50 documents, 0 errors, 1 warnings"]


def test_max_problems_limits_the_listing_but_not_the_count(capsys, redocred_dir, tmp_path):
    raw = load(redocred_dir / "dev_50.json")
    for d in raw[:5]:
        d["vertexSet"] = []
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    code, out, _ = run(capsys, "data", "validate", path, "--max-problems", "2")
    lines = out.splitlines()
    assert code == 1
    assert [ln.split(": ", 2)[1] for ln in lines[:2]] == [
        f'document 0 ("{raw[0]["title"]}")',
        f'document 1 ("{raw[1]["title"]}")',
    ]
    assert lines[2] == "... and 3 more problems (--max-problems 0 lists all)"
    assert lines[3] == f"{path}: FAILED: 50 documents, 5 errors, 0 warnings"


def test_malformed_json_is_one_error_line_with_exit_2(capsys, redocred_dir, tmp_path):
    text = (redocred_dir / "dev_50.json").read_text(encoding="utf-8")
    path = tmp_path / "truncated.json"
    path.write_text(text[:1000], encoding="utf-8")
    code, out, err = run(capsys, "data", "validate", path)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"lmrc: error: {path}: line 1, column ")
    assert "malformed JSON" in err


def test_validate_of_a_missing_file_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "data", "validate", tmp_path / "absent.json")
    assert code == 2
    assert err == f"lmrc: error: {tmp_path / 'absent.json'}: file not found\n"


# --- stats ------------------------------------------------------------------------------------------------


def reference_stats(raw: list[dict]) -> dict:
    """An independent count straight from the JSON (no lmrc types)."""
    facts = intra = positive = pairs = 0
    relations: Counter = Counter()
    for d in raw:
        n = len(d["vertexSet"])
        pairs += n * (n - 1)
        triples = {(x["h"], x["t"], x["r"]) for x in d["labels"]}
        facts += len(triples)
        positive += len({(h, t) for h, t, _ in triples})
        relations.update(r for _, _, r in triples)
        for h, t, _ in triples:
            distance = min(
                abs(a["sent_id"] - b["sent_id"]) for a in d["vertexSet"][h] for b in d["vertexSet"][t]
            )
            intra += distance == 0
    return {
        "documents": len(raw),
        "sentences": sum(len(d["sents"]) for d in raw),
        "tokens": sum(len(s) for d in raw for s in d["sents"]),
        "entities": sum(len(d["vertexSet"]) for d in raw),
        "mentions": sum(len(e) for d in raw for e in d["vertexSet"]),
        "entity_pairs": pairs,
        "facts": facts,
        "pairs_with_relation": positive,
        "na_ratio": (pairs - positive) / pairs,
        "intra_sentence_facts": intra,
        "inter_sentence_facts": facts - intra,
        "relation_counts": relations,
    }


def test_stats_on_dev_50_match_an_independent_count(capsys, redocred_dir, tmp_path):
    ref = reference_stats(load(redocred_dir / "dev_50.json"))
    names = load(redocred_dir / "rel_info.json")
    out_json = tmp_path / "stats.json"
    code, out, _ = run(
        capsys,
        "data",
        "stats",
        redocred_dir / "dev_50.json",
        "--rel-info",
        redocred_dir / "rel_info.json",
        "--json",
        out_json,
        "--top",
        "3",
    )
    assert code == 0
    got = load(out_json)
    for key, value in ref.items():
        if key == "relation_counts":
            continue
        assert got[key] == pytest.approx(value), key
    assert got["facts"] == 1648 and got["documents"] == 50  # the documented size of dev_50
    assert got["labelled_documents"] == 50
    assert {r["id"]: r["count"] for r in got["relations"]} == dict(ref["relation_counts"])
    assert all(r["name"] == names[r["id"]] for r in got["relations"])
    counts = [r["count"] for r in got["relations"]]
    assert counts == sorted(counts, reverse=True)

    assert re.search(r"^  documents +50$", out, re.M)
    assert re.search(r"^  facts +1,648 ", out, re.M)
    assert re.search(rf"^  NA ratio \(pairs without relation\) +{ref['na_ratio']:.4f}$", out, re.M)
    top = got["relations"][0]
    assert re.search(rf"^ +{top['count']:,}  {top['id']} +{re.escape(top['name'])}$", out, re.M)
    assert "top 3 relations by count:" in out


def test_stats_of_unlabelled_documents_leave_label_counts_empty(capsys, redocred_dir, tmp_path):
    raw = load(redocred_dir / "dev_50.json")
    for d in raw:
        del d["labels"]
    path = tmp_path / "unlabelled.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    out_json = tmp_path / "stats.json"
    code, out, _ = run(capsys, "data", "stats", path, "--json", out_json)
    got = load(out_json)
    assert code == 0
    assert got["labelled_documents"] == 0 and got["facts"] is None and got["na_ratio"] is None
    assert got["entity_pairs"] == reference_stats([dict(d, labels=[]) for d in raw])["entity_pairs"]
    assert re.search(r"^  facts +-$", out, re.M)


def test_stats_refuses_an_invalid_file(capsys, redocred_dir, tmp_path):
    raw = load(redocred_dir / "dev_50.json")
    raw[1]["labels"][0]["h"] = 10_000
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    code, _, err = run(capsys, "data", "stats", path)
    assert code == 2
    assert err.startswith(
        f'lmrc: error: {path}: document 1 ("{raw[1]["title"]}"): labels[0].h: 10000 out of range'
    )


# --- split ------------------------------------------------------------------------------------------------


def test_split_reproduces_the_shared_dev_50_train_450_split(capsys, redocred_dir, tmp_path):
    # The shared files were made with seed 13: the first 10% of the shuffled order is dev_50.
    code, _, _ = run(
        capsys,
        "data",
        "split",
        redocred_dir / "dev_revised.json",
        "--ratios",
        "0.1,0.9",
        "--seed",
        "13",
        "--out-dir",
        tmp_path,
    )
    assert code == 0
    assert load(tmp_path / "dev_revised_split0.json") == load(redocred_dir / "dev_50.json")
    assert load(tmp_path / "dev_revised_split1.json") == load(redocred_dir / "train_450.json")


def test_split_is_seeded_disjoint_complete_and_keeps_every_field(capsys, redocred_dir, tmp_path):
    src = redocred_dir / "dev_50.json"
    raw = load(src)
    args = ["data", "split", src, "--ratios", "0.6,0.3,0.1", "--out-dir"]
    assert run(capsys, *args, tmp_path / "a", "--seed", "7")[0] == 0
    assert run(capsys, *args, tmp_path / "b", "--seed", "7")[0] == 0
    assert run(capsys, *args, tmp_path / "c", "--seed", "8")[0] == 0
    names = [f"dev_50_split{i}.json" for i in range(3)]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert load(tmp_path / "a" / names[0]) != load(tmp_path / "c" / names[0])

    manifest = load(tmp_path / "a" / "dev_50_split_manifest.json")
    assert manifest["seed"] == 7 and manifest["ratios"] == [0.6, 0.3, 0.1]
    parts = [p["indices"] for p in manifest["parts"]]
    assert [len(p) for p in parts] == [30, 15, 5]
    assert sorted(i for p in parts for i in p) == list(range(50))  # disjoint and complete
    for name, idx in zip(names, parts):
        docs = load(tmp_path / "a" / name)
        assert docs == [raw[i] for i in idx]  # every field, e.g. the mentions' global_pos, in file order
    assert "global_pos" in load(tmp_path / "a" / names[0])[0]["vertexSet"][0][0]


@pytest.mark.parametrize(
    ("n", "ratios", "sizes"),
    [
        (50, (0.9, 0.1), [45, 5]),
        (10, (1 / 3, 1 / 3, 1 / 3), [4, 3, 3]),
        (7, (0.5, 0.5), [4, 3]),
        (100, (0.29, 0.71), [29, 71]),
        (3, (0.2, 0.2, 0.6), [1, 0, 2]),
    ],
)
def test_part_sizes_follow_the_largest_remainder_rule(n, ratios, sizes):
    assert part_sizes(n, ratios) == sizes
    assert [len(p) for p in split_indices(n, ratios, seed=0)] == sizes


@pytest.mark.parametrize(
    ("ratios", "message"),
    [
        ("0.9,0.2", "ratios [0.9, 0.2]: must sum to 1 (they sum to 1.1)"),
        ("0.9,x", "--ratios '0.9,x': expected comma-separated numbers, e.g. 0.9,0.1"),
        ("1.0", "ratios [1.0]: need at least two parts"),
        ("1.5,-0.5", "ratios [1.5, -0.5]: every ratio must be a positive number"),
    ],
)
def test_split_refuses_bad_ratios(capsys, redocred_dir, tmp_path, ratios, message):
    code, _, err = run(
        capsys,
        "data",
        "split",
        redocred_dir / "dev_50.json",
        "--ratios",
        ratios,
        "--seed",
        "1",
        "--out-dir",
        tmp_path,
    )
    assert code == 2
    assert err == f"lmrc: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_split_refuses_a_ratio_that_leaves_a_part_empty(capsys, redocred_dir, tmp_path):
    src = redocred_dir / "dev_50.json"
    code, _, err = run(
        capsys, "data", "split", src, "--ratios", "0.995,0.005", "--seed", "1", "--out-dir", tmp_path
    )
    assert code == 2
    assert "leaves part 1 empty" in err
    assert list(tmp_path.iterdir()) == []

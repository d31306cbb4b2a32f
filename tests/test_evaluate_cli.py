"""`lmrc evaluate`: the table, the JSON file, repeatable --train, and one-line errors for bad inputs."""

from __future__ import annotations

import json

import pytest

from lmrc.cli import main


def _m(name: str, sent_id: int) -> dict:
    return {"name": name, "sent_id": sent_id, "pos": [0, 1], "type": "X"}


# One document, 3 entities: facts (0,1,P17) intra and (0,2,P30) inter; "Paris"/"France" is a train fact.
GOLD = [
    {
        "title": "A",
        "sents": [["w", "w"], ["w", "w"]],
        "vertexSet": [[_m("Paris", 0)], [_m("France", 0)], [_m("Europe", 1)]],
        "labels": [
            {"h": 0, "t": 1, "r": "P17", "evidence": [0]},
            {"h": 0, "t": 2, "r": "P30", "evidence": [0, 1]},
        ],
    }
]
TRAIN_1 = [{"title": "T1", "sents": [["w"]], "vertexSet": [[_m("Paris", 0)], [_m("France", 0)]],
            "labels": [{"h": 0, "t": 1, "r": "P17", "evidence": []}]}]  # fmt: skip
TRAIN_2 = [{"title": "T2", "sents": [["w"]], "vertexSet": [[_m("Rome", 0)], [_m("Italy", 0)]],
            "labels": [{"h": 0, "t": 1, "r": "P17", "evidence": []}, {"h": 1, "t": 0, "r": "P36", "evidence": []}]}]  # fmt: skip
# 3 unique predictions (one duplicate), 1 correct and in train: P = 1/3, R = 1/2, F1 = 0.4;
# Ign P = 0 / 2 = 0, Ign F1 = 0; evidence: predicted 1 + 0, overlap 1, gold 3 -> P 1, R 1/3, F1 0.5.
PREDS = [
    {"title": "A", "h_idx": 0, "t_idx": 1, "r": "P17", "evidence": [0]},
    {"title": "A", "h_idx": 0, "t_idx": 1, "r": "P17"},
    {"title": "A", "h_idx": 0, "t_idx": 2, "r": "P17"},
    {"title": "elsewhere", "h_idx": 0, "t_idx": 1, "r": "P17", "evidence": [0]},
]


@pytest.fixture
def files(tmp_path):
    out = {}
    for name, data in (("gold", GOLD), ("train1", TRAIN_1), ("train2", TRAIN_2), ("pred", PREDS)):
        out[name] = tmp_path / f"{name}.json"
        out[name].write_text(json.dumps(data))
    out["rel_info"] = tmp_path / "rel_info.json"
    out["rel_info"].write_text(json.dumps({"P17": "country", "P30": "continent", "P36": "capital"}))
    return out


def _run(*argv: object) -> int:
    return main([str(a) for a in argv])


def test_prints_the_table_and_writes_json(files, tmp_path, capsys):
    out = tmp_path / "sub" / "metrics.json"
    rc = _run(
        "evaluate", "--pred", files["pred"], "--gold", files["gold"], "--train", files["train1"], "--out", out
    )
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("4 predictions (1 duplicates removed, 1 for titles not in gold")
    relation = next(line for line in lines if line.startswith("relation"))
    assert relation.split() == ["relation", "33.33", "50.00", "40.00", "1", "3", "2"]
    assert next(line for line in lines if line.startswith("ign")).split()[1:4] == ["0.00", "50.00", "0.00"]
    d = json.loads(out.read_text())
    assert d["summary"]["f1"] == pytest.approx(0.4)
    assert d["summary"]["ign_f1"] == 0.0
    assert d["evidence"]["f1"] == pytest.approx(0.5)
    assert d["ign"]["correct_in_train"] == 1
    assert d["frequent_relations"] == ["P17"]
    assert d["inputs"] == {
        "pred": str(files["pred"]),
        "gold": str(files["gold"]),
        "train": [str(files["train1"])],
    }
    assert not list(out.parent.glob(".*.tmp"))


@pytest.mark.parametrize("style", ["nargs", "repeat"])
def test_train_accepts_several_files(files, tmp_path, capsys, style):
    out = tmp_path / "m.json"
    if style == "nargs":
        train_args = ["--train", files["train1"], files["train2"]]
    else:
        train_args = ["--train", files["train1"], "--train", files["train2"]]
    assert _run("evaluate", "--pred", files["pred"], "--gold", files["gold"], *train_args, "--out", out) == 0
    d = json.loads(out.read_text())
    assert d["frequent_relations"] == ["P17", "P36"]  # P17: 2 facts over both files, P36: 1
    assert len(d["inputs"]["train"]) == 2


def test_without_train_ign_equals_f1_and_frequent_is_null(files, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert _run("evaluate", "--pred", files["pred"], "--gold", files["gold"], "--out", out) == 0
    assert "no train files" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["summary"]["ign_f1"] == d["summary"]["f1"] == pytest.approx(0.4)
    assert d["frequent"] is None and d["long_tail"] is None and d["train_used"] is False


def test_rel_info_names_the_per_relation_rows(files, tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = ["evaluate", "--pred", files["pred"], "--gold", files["gold"], "--rel-info", files["rel_info"]]
    assert _run(*argv, "--per-relation", "--out", out) == 0
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("P17 country")).split()[2:] == [
        "33.33",
        "100.00",
        "50.00",
        "1",
        "3",
        "1",
    ]
    assert json.loads(out.read_text())["relation_names"] == {"P17": "country", "P30": "continent"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            json.dumps([{"title": "A", "h_idx": "0", "t_idx": 1, "r": "P17"}]),
            "predictions[0].h_idx: expected an integer",
        ),
        (json.dumps([PREDS[0], {"title": "A", "h_idx": 0, "t_idx": 1}]), "predictions[1]: missing field 'r'"),
        (json.dumps({"title": "A"}), "expected a JSON list of predictions"),
        ('[{"title": "A",', "line 1, column 16: malformed JSON"),
    ],
)
def test_malformed_predictions_exit_2_with_one_line(files, capsys, content, message):
    files["pred"].write_text(content)
    assert _run("evaluate", "--pred", files["pred"], "--gold", files["gold"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.err
    assert err[0].startswith(f"lmrc: error: {files['pred']}: ")
    assert message in err[0]


def test_unlabelled_gold_exits_2_naming_the_file(files, capsys):
    files["gold"].write_text(json.dumps([{k: v for k, v in GOLD[0].items() if k != "labels"}]))
    assert _run("evaluate", "--pred", files["pred"], "--gold", files["gold"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"lmrc: error: {files['gold']}: document 0 (\"A\"): missing field 'labels' (a gold file must be labelled)"
    )

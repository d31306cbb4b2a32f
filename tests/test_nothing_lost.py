"""Nothing lost: an output never replaces an input or another output (however the paths are spelled), an
existing output or a killed run's progress is replaced only with --overwrite, operating-system errors and bad
options are one line `lmrc: error: ...` with exit 2 (--debug adds the traceback, not another exit code), and a
damaged adapter or a bad data file is reported before any model is loaded.

The path checks run before any work, so most commands here are given folders that are not models at all: had
the command started working, it would fail differently (and the inputs would be gone)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmrc.cli import main
from lmrc.errors import LmrcError
from lmrc.io import sidecar
from lmrc.paths import Named, check_paths
from lmrc.stage2 import modeling
from lmrc.stage2.adapter import ADAPTER_WEIGHTS, check_safetensors
from lmrc.stage2.modeling import ADAPTER_CONFIG, CONFIG_FILE


def _m(name: str, sent_id: int) -> dict:
    return {"name": name, "sent_id": sent_id, "pos": [0, 1], "type": "X"}


DOCS = [
    {
        "title": "A",
        "sents": [["w", "w"], ["w", "w"]],
        "vertexSet": [[_m("Paris", 0)], [_m("France", 0)], [_m("Europe", 1)]],
        "labels": [{"h": 0, "t": 1, "r": "P17", "evidence": [0]}],
    }
]
PREDS = [{"title": "A", "h_idx": 0, "t_idx": 1, "r": "P17", "evidence": [0]}]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lmrc: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A docs file, a result file and a rel_info, in the working folder (so relative spellings reach them)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.json").write_text(json.dumps(DOCS))
    (tmp_path / "pred.json").write_text(json.dumps(PREDS))
    (tmp_path / "rel_info.json").write_text(json.dumps({"P17": "country"}))
    (tmp_path / "model").mkdir()  # stands in for a checkpoint / adapter folder: never loaded here
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ 1: outputs vs inputs

SAME_FILE_CASES = {
    "predict --output is --input (absolute vs relative)": (
        ["predict", "--input", "docs.json", "--output", "{abs}/docs.json", "--mode", "stage1-only"]
        + ["--stage1", "model"],
        "--input",
    ),
    "predict --save-candidates is --output": (
        ["predict", "--input", "docs.json", "--output", "r.json", "--save-candidates", "./r.json"]
        + ["--stage1", "model"],
        "--save-candidates",
    ),
    "predict --output is the --train file": (
        [
            "predict",
            "--input",
            "docs.json",
            "--output",
            "pred.json",
            "--train",
            "pred.json",
            "--stage1",
            "model",
        ],
        "--train",
    ),
    "stage1 predict --output is --input": (
        [
            "stage1",
            "predict",
            "--checkpoint",
            "model",
            "--input",
            "docs.json",
            "--output",
            "sub/../docs.json",
        ],
        "--input",
    ),
    "stage1 predict --relations is --output": (
        ["stage1", "predict", "--checkpoint", "model", "--input", "docs.json", "--output", "c.json"]
        + ["--relations", "{abs}/c.json"],
        "--relations",
    ),
    "stage1 predict --save-calibration is --tune": (
        ["stage1", "predict", "--checkpoint", "model", "--input", "docs.json", "--output", "c.json"]
        + ["--recall-target", "0.9", "--tune", "pred.json", "--save-calibration", "pred.json"],
        "--tune",
    ),
    "stage1 predict --output is the --gold file through a symlink": (
        ["stage1", "predict", "--checkpoint", "model", "--input", "docs.json", "--output", "link.json"]
        + ["--gold", "pred.json"],
        "--gold",
    ),
    "stage2 predict --output is --input": (
        ["stage2", "predict", "--adapter", "model", "--input", "docs.json", "--output", "{abs}/docs.json"],
        "--input",
    ),
    "stage2 predict --debug-out is --candidates": (
        ["stage2", "predict", "--adapter", "model", "--input", "docs.json", "--output", "r.json"]
        + ["--candidates", "pred.json", "--debug-out", "pred.json"],
        "--candidates",
    ),
    "stage2 predict --output's summary is --input": (
        ["stage2", "predict", "--adapter", "model", "--input", "r.summary.json", "--output", "r.json"],
        "--input",
    ),
    "evaluate --out is --gold": (
        ["evaluate", "--pred", "pred.json", "--gold", "docs.json", "--out", "{abs}/sub/../docs.json"],
        "--gold",
    ),
    "data stats --json is the input": (["data", "stats", "docs.json", "--json", "./docs.json"], "the input"),
}


@pytest.mark.parametrize("case", sorted(SAME_FILE_CASES))
def test_an_output_never_replaces_an_input(files, capsys, case):
    argv, flag = SAME_FILE_CASES[case]
    (files / "sub").mkdir()
    (files / "link.json").symlink_to(files / "pred.json")
    (files / "r.summary.json").write_text(json.dumps(DOCS))
    (files / "docs_split0.json").write_text(json.dumps(DOCS))
    before = snapshot(files)
    code, out, err = run(capsys, *[a.replace("{abs}", str(files)) for a in argv])
    line = one_error_line(err)
    assert code == 2
    assert f"is the same file as {flag}" in line or f"and {flag} name the same file" in line, line
    assert snapshot(files) == before  # nothing written, nothing replaced


def test_merge_refuses_a_shard_spelled_differently(files, capsys):
    for name in ("s0.json", "s1.json"):
        (files / name).write_text("[]")
    before = snapshot(files)
    for spelling in (str(files / "s1.json"), "./s1.json", "sub/../s1.json"):
        (files / "sub").mkdir(exist_ok=True)
        code, _, err = run(capsys, "merge", "s0.json", "s1.json", "--output", spelling)
        assert code == 2 and "is the same file as a shard" in one_error_line(err)
    assert {k: v for k, v in snapshot(files).items()} == before


def test_two_outputs_naming_one_file_are_refused(files, capsys):
    code, _, err = run(
        capsys, "stage1", "predict", "--checkpoint", "model", "--input", "docs.json",
        "--output", "c.json", "--relations", "./c.json",
    )  # fmt: skip
    assert code == 2 and "--output and --relations name the same file" in one_error_line(err)


# ------------------------------------------------------------------------- 2: operating-system errors


def test_an_output_that_is_a_folder_is_refused_before_work(files, capsys):
    (files / "out").mkdir()
    code, _, err = run(capsys, "evaluate", "--pred", "pred.json", "--gold", "docs.json", "--out", "out")
    assert code == 2 and one_error_line(err) == "lmrc: error: out: is a folder; --out names a file to write"
    code, _, err = run(
        capsys, "predict", "--input", "docs.json", "--output", "out", "--stage1", "model"
    )  # before the (missing) model would be loaded
    assert code == 2 and "out: is a folder" in one_error_line(err)


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: chmod 555 (not for root), else sysfs (read-only to us)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel")):
        try:
            fd = os.open(candidate / ".lmrc-probe", os.O_CREAT | os.O_WRONLY, 0o600)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(candidate / ".lmrc-probe")
    pytest.skip("no folder here refuses writes to this user")


def test_an_unwritable_output_folder_is_one_line_before_work(files, capsys):
    ro = _unwritable_folder(files)
    try:
        code, _, err = run(
            capsys, "evaluate", "--pred", "pred.json", "--gold", "docs.json", "--out", ro / "m.json"
        )
        line = one_error_line(err)
        assert code == 2 and line.startswith(f"lmrc: error: {ro}: cannot write here (--out): "), line
        code, _, err = run(
            capsys, "predict", "--input", "docs.json", "--output", ro / "sub" / "r.json", "--stage1", "model"
        )
        assert code == 2 and "cannot write here (--output)" in one_error_line(err)
    finally:
        (files / "ro").chmod(0o755)


def test_a_full_disk_is_one_line_naming_the_output(files, capsys, monkeypatch):
    """ENOSPC from the final write (an fsync that names no file) is reported with the path being written."""
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run(capsys, "data", "stats", "docs.json", "--json", "stats.json")
    assert code == 2
    assert one_error_line(err) == f"lmrc: error: stats.json: {os.strerror(errno.ENOSPC)}"
    assert not (files / "stats.json").exists() and not list(files.glob(".stats.json.*"))  # no temp file left
    code, _, err = run(capsys, "--debug", "data", "stats", "docs.json", "--json", "stats.json")
    assert code == 2  # --debug adds the traceback and keeps the exit code
    assert "Traceback" in err and err.rstrip().endswith(
        f"lmrc: error: stats.json: {os.strerror(errno.ENOSPC)}"
    )


def test_permission_denied_while_reading_is_one_line(files, capsys, monkeypatch):
    import builtins

    real_open = builtins.open

    def denied(path, *args, **kwargs):
        if str(path).endswith("rel_info.json"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: denied(self) and "")
    code, _, err = run(capsys, "data", "stats", "docs.json", "--rel-info", "rel_info.json")
    line = one_error_line(err)
    assert code == 2 and line.startswith("lmrc: error: rel_info.json: ") and "Permission denied" in line


def test_debug_keeps_the_exit_code_of_a_library_error(files, capsys):
    code, _, err = run(capsys, "evaluate", "--pred", "missing.json", "--gold", "docs.json")
    assert code == 2 and "Traceback" not in err
    code, _, err = run(capsys, "--debug", "evaluate", "--pred", "missing.json", "--gold", "docs.json")
    assert code == 2 and "Traceback" in err
    assert err.rstrip().splitlines()[-1] == "lmrc: error: missing.json: file not found"


# ------------------------------------------------------------------- 4: a damaged adapter, before the base


def _save_adapter(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({"a": torch.arange(12.0).view(3, 4), "b": torch.ones(5, dtype=torch.int64)}, folder / "w.st")
    (folder / ADAPTER_CONFIG).write_text("{}")
    (folder / CONFIG_FILE).write_text("{}")
    return folder


def test_a_truncated_adapter_is_one_line_before_the_base_model_loads(tmp_path, monkeypatch):

    adapter = _save_adapter(tmp_path / "adapter")
    good = (adapter / "w.st").read_bytes()
    check_safetensors(adapter / "w.st")  # a complete file passes
    for cut in (len(good) - 1, len(good) - 40, 100, 9, 3, 0):
        (adapter / ADAPTER_WEIGHTS).write_bytes(good[:cut])
        with pytest.raises(LmrcError, match=f"{ADAPTER_WEIGHTS}: damaged or truncated safetensors file"):
            check_safetensors(adapter / ADAPTER_WEIGHTS)
    (adapter / ADAPTER_WEIGHTS).write_bytes(good + b"\0" * 8)
    with pytest.raises(LmrcError, match="8 bytes after the last tensor"):
        check_safetensors(adapter / ADAPTER_WEIGHTS)

    (adapter / ADAPTER_WEIGHTS).write_bytes(good[:-7])

    def must_not_load(*args, **kwargs):
        raise AssertionError("the base model was loaded before the adapter was checked")

    monkeypatch.setattr(modeling, "load_base_model", must_not_load)
    monkeypatch.setattr(modeling, "load_adapter_config", must_not_load)
    with pytest.raises(LmrcError, match="damaged or truncated"):
        modeling.load_adapter(adapter)


# ---------------------------------------------------------------- 5: bad configs and numeric options


def test_a_non_utf8_config_is_one_line(files, capsys):
    (files / "bad.yaml").write_bytes(b"train:\n  epochs: 2\n# caf\xe9\n")
    code, _, err = run(capsys, "stage1", "train", "--config", "bad.yaml")
    assert code == 2
    assert one_error_line(err).startswith("lmrc: error: bad.yaml: line 3: not UTF-8 text")


@pytest.mark.parametrize(
    "argv, option",
    [
        (["stage1", "predict", "--checkpoint", "m", "--input", "d", "--output", "o", "--batch-size", "0"], "--batch-size"),
        (["stage1", "predict", "--checkpoint", "m", "--input", "d", "--output", "o", "--max-per-doc", "-1"], "--max-per-doc"),
        (["stage1", "predict", "--checkpoint", "m", "--input", "d", "--output", "o", "--recall-target", "1.5"], "--recall-target"),
        (["stage1", "predict", "--checkpoint", "m", "--input", "d", "--output", "o", "--threshold", "nan"], "--threshold"),
        (["stage1", "crossfit", "--output", "o", "--folds", "1"], "--folds"),
        (["stage1", "train", "--stop-after-steps", "0"], "--stop-after-steps"),
        (["predict", "--input", "d", "--output", "o", "--max-per-doc", "0"], "--max-per-doc"),
        (["predict", "--input", "d", "--output", "o", "--recall-target", "0"], "--recall-target"),
        (["data", "stats", "d", "--top", "-2"], "--top"),
        (["data", "validate", "d", "--max-problems", "x"], "--max-problems"),
        (["data", "fetch", "redocred", "--timeout", "0"], "--timeout"),
    ],
)  # fmt: skip
def test_numeric_options_are_checked_where_they_are_parsed(capsys, argv, option):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {option}" in err and "Traceback" not in err


# ------------------------------------------------------------- 6: existing outputs and killed runs' progress


def test_an_existing_output_is_replaced_only_with_overwrite(files, capsys):
    (files / "m.json").write_text("keep me")
    argv = ["evaluate", "--pred", "pred.json", "--gold", "docs.json", "--out", "m.json"]
    code, _, err = run(capsys, *argv)
    assert (
        code == 2
        and one_error_line(err) == "lmrc: error: m.json: exists (--out); pass --overwrite to replace it"
    )
    assert (files / "m.json").read_text() == "keep me"
    code, _, _ = run(capsys, *argv, "--overwrite")
    assert code == 0 and json.loads((files / "m.json").read_text())["inputs"]["gold"] == "docs.json"


def test_a_killed_runs_progress_is_kept_without_resume_or_overwrite(files, capsys):
    """The progress file of a killed `lmrc predict` / `stage2 predict` survives a rerun without --resume."""
    progress = files / "r.progress.jsonl"
    progress.write_text('{"format": "lmrc-predict-progress", "fingerprint": {}}\n{"batch": 0}\n')
    before = progress.read_bytes()
    for argv in (
        ["predict", "--input", "docs.json", "--output", "r.json", "--stage1", "model"],
        ["stage2", "predict", "--adapter", "model", "--input", "docs.json", "--output", "r.json"],
    ):
        code, _, err = run(capsys, *argv)
        line = one_error_line(err)
        assert code == 2 and line.startswith("lmrc: error: r.progress.jsonl: progress of an earlier run"), (
            line
        )
        assert "--resume continues it, --overwrite discards it" in line
        assert progress.read_bytes() == before
    # --resume and --overwrite get past the check (to the stand-in model folder, which is not a model).
    for flag in ("--resume", "--overwrite"):
        code, _, err = run(
            capsys, "predict", "--input", "docs.json", "--output", "r.json", "--stage1", "model", flag
        )
        assert code == 2 and "progress of an earlier run" not in err and "Traceback" not in err


def test_a_finished_result_needs_overwrite_or_resume(files, capsys):
    (files / "r.json").write_text("[]")
    code, _, err = run(capsys, "predict", "--input", "docs.json", "--output", "r.json", "--stage1", "model")
    assert code == 2 and one_error_line(err).endswith(
        "r.json: exists (--output); pass --overwrite to replace it"
    )


# ---------------------------------------------------------------------------------- 7: stage1 train


def test_stage1_train_reports_a_bad_data_file_before_loading_the_encoder(files, capsys):
    (files / "train.json").write_text('[{"title": "x"')
    code, _, err = run(
        capsys, "stage1", "train", "--output-dir", "run",
        "--set", "model.encoder=no-such-encoder-anywhere", "--set", "data.train=train.json",
        "--set", "data.tune=null", "--set", "data.rel_info=rel_info.json",
    )  # fmt: skip
    line = one_error_line(err)
    assert code == 2 and line.startswith("lmrc: error: train.json: line 1"), line


def test_an_earlier_runs_summary_is_not_replaced_without_overwrite(tmp_path):
    """The result file is gone but its summary is still there: a new run must not replace it silently."""

    out = tmp_path / "result.json"
    summary = sidecar(out, ".summary.json")
    summary.write_text("{}")
    companions = [Named("the summary", summary)]
    with pytest.raises(LmrcError, match="exists"):
        check_paths([], [Named("--output", out)], companions=companions)
    check_paths([], [Named("--output", out)], companions=companions, overwrite=True)
    check_paths([], [Named("--output", out)], companions=companions, resume=True)

"""The shared helpers: atomic files and folders, sidecar names, and the progress bar / log line."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from lmrc.io import AtomicFile, sidecar, write_dir_atomically
from lmrc.progress import Progress


def test_sidecar_names_replace_the_last_suffix_only(tmp_path):
    assert sidecar(tmp_path / "dev.result.json", ".summary.json") == tmp_path / "dev.result.summary.json"
    assert sidecar(tmp_path / "result", ".progress.jsonl") == tmp_path / "result.progress.jsonl"


def test_an_atomic_file_appears_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "data.bin"
    with AtomicFile(path) as fh:
        fh.write(b"first")
        assert not path.exists()  # nothing under the final name until the block ends
    assert path.read_bytes() == b"first" and (path.stat().st_mode & 0o777) == 0o644
    with pytest.raises(RuntimeError):
        with AtomicFile(path, text=True, suffix=".part") as fh:
            fh.write("second, half written")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"first"  # the old file is untouched and no temporary file is left
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.bin"]


def test_an_atomic_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    write_dir_atomically(target, lambda d: (d / "a.txt").write_text("one"))
    assert (target / "a.txt").read_text() == "one"

    def fails(folder):
        (folder / "b.txt").write_text("two")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_dir_atomically(target, fails)
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    write_dir_atomically(target, lambda d: (d / "b.txt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_progress_logs_lines_when_there_is_no_terminal(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file or a batch job's output: no terminal
    log = logging.getLogger("lmrc.test.progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        with Progress(4, "work", "doc", initial=1, show=None, every_s=0.0, logger=log) as bar:
            bar.update(2, triples=5)
            bar.update(1, triples=7)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # one line per update at every_s=0
    assert lines[-1].startswith("work: 4 / 4 docs, triples 7, ") and lines[-1].endswith(" docs/s")


def test_progress_is_silent_when_asked_and_logs_only_every_so_often(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    log = logging.getLogger("lmrc.test.progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        with Progress(3, "quiet", show=False, every_s=0.0, logger=log) as bar:
            bar.update(3)
        with Progress(3, "slow", show=None, every_s=3600.0, logger=log) as bar:
            bar.update(1)
            bar.update(1)
            bar.update(1)  # the last one always logs
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["slow"]

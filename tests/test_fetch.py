"""lmrc/data/fetch.py against a local HTTP server on 127.0.0.1, and the local-copy path (LMRC_DATA_DIR/--from)."""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lmrc.cli import main
from lmrc.data import fetch
from lmrc.data.fetch import REDOCRED_SHA256, REDOCRED_URL, fetch_redocred
from lmrc.errors import LmrcError


class FileServer:
    """Serves the files of `root` over HTTP; paths in `short` get a Content-Length 100 bytes too long."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.short: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                f = server.root / self.path.lstrip("/")
                if not f.is_file():
                    self.send_error(404, "Not Found")
                    return
                body = f.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (100 if self.path in server.short else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    # The Makefile exports LMRC_DATA_DIR; these tests choose their source explicitly.
    monkeypatch.delenv("LMRC_DATA_DIR", raising=False)
    monkeypatch.delenv("LMRC_REDOCRED_URL", raising=False)
    monkeypatch.setenv("LMRC_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    s = FileServer(root)
    yield s
    s.close()


FAKE_TRAIN = (
    b'[{"title": "T", "sents": [["a"]], "vertexSet": [[{"name": "a", "sent_id": 0, "pos": [0, 1]}]]}]'
)
FAKE_DEV = b'[{"title": "D", "sents": [["b"]], "vertexSet": [[{"name": "b", "sent_id": 0, "pos": [0, 1]}]]}]'


@pytest.fixture
def fake_dev_hash(monkeypatch):
    """Make FAKE_DEV the 'published' dev file, so the hash check runs without the real data."""
    monkeypatch.setitem(REDOCRED_SHA256, "dev_revised.json", hashlib.sha256(FAKE_DEV).hexdigest())


def test_download_of_the_real_dev_file_verifies_its_published_sha256(server, redocred_dir, tmp_path):
    shutil.copy(redocred_dir / "dev_revised.json", server.root / "dev_revised.json")
    out = tmp_path / "out"
    (result,) = fetch_redocred(out, files="dev", base_url=server.url)
    assert (result.status, result.verified, result.path) == ("downloaded", True, out / "dev_revised.json")
    assert result.sha256 == "051ee1d057204a5d08ef5502beacdadf191245b5eaf0e29ec2c607cf002c016f"
    assert (out / "dev_revised.json").read_bytes() == (redocred_dir / "dev_revised.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["dev_revised.json"]
    assert server.requests == ["/dev_revised.json"]


def test_corrupted_download_is_rejected_and_leaves_no_file(server, tmp_path, fake_dev_hash):
    corrupted = FAKE_DEV.replace(b'"b"', b'"c"')
    (server.root / "dev_revised.json").write_bytes(corrupted)
    out = tmp_path / "out"
    with pytest.raises(LmrcError) as exc:
        fetch_redocred(out, files="dev", base_url=server.url)
    assert str(exc.value) == (
        f"{server.url}/dev_revised.json: sha256 mismatch: expected {hashlib.sha256(FAKE_DEV).hexdigest()}, "
        f"got {hashlib.sha256(corrupted).hexdigest()}; the file was discarded"
    )
    assert list(out.iterdir()) == []


def test_truncated_download_is_rejected_and_leaves_no_file(server, tmp_path):
    (server.root / "train_revised.json").write_bytes(FAKE_TRAIN)
    server.short.add("/train_revised.json")
    out = tmp_path / "out"
    with pytest.raises(LmrcError) as exc:
        fetch_redocred(out, files="train", base_url=server.url)
    assert str(exc.value) == (
        f"{server.url}/train_revised.json: transfer incomplete: got {len(FAKE_TRAIN)} of {len(FAKE_TRAIN) + 100} "
        "bytes; nothing was saved"
    )
    assert list(out.iterdir()) == []


def test_missing_remote_file_is_an_http_error_naming_the_url(server, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LmrcError) as exc:
        fetch_redocred(out, files="test", base_url=server.url)
    assert str(exc.value) == f"{server.url}/test_revised.json: download failed: HTTP 404 Not Found"
    assert list(out.iterdir()) == []


def test_unreachable_server_says_how_to_use_a_local_copy(tmp_path):
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LmrcError, match=r"cannot download: .*point --from or LMRC_DATA_DIR at a local copy"):
        fetch_redocred(tmp_path / "out", files="dev", base_url=f"http://127.0.0.1:{port}", timeout=5)


def test_file_without_a_published_hash_is_downloaded_and_its_hash_recorded(server, monkeypatch, tmp_path):
    (server.root / "train_revised.json").write_bytes(FAKE_TRAIN)
    monkeypatch.setenv("LMRC_REDOCRED_URL", server.url)  # no base_url argument: the env variable is used
    (result,) = fetch_redocred(files="train")
    target = tmp_path / "cache" / "redocred" / "train_revised.json"  # the default $LMRC_CACHE/redocred
    assert (result.status, result.path, result.verified) == ("downloaded", target, False)
    assert result.sha256 == hashlib.sha256(FAKE_TRAIN).hexdigest()
    assert target.read_bytes() == FAKE_TRAIN
    assert target.stat().st_mode & 0o777 == 0o644


def test_a_good_file_already_there_is_not_fetched_again_unless_forced(server, tmp_path, fake_dev_hash):
    (server.root / "dev_revised.json").write_bytes(FAKE_DEV)
    out = tmp_path / "out"
    assert fetch_redocred(out, files="dev", base_url=server.url)[0].status == "downloaded"
    assert fetch_redocred(out, files="dev", base_url=server.url)[0].status == "cached"
    assert len(server.requests) == 1
    assert fetch_redocred(out, files="dev", base_url=server.url, force=True)[0].status == "downloaded"
    assert len(server.requests) == 2


def test_a_damaged_cached_file_is_fetched_again(server, tmp_path, fake_dev_hash):
    (server.root / "dev_revised.json").write_bytes(FAKE_DEV)
    out = tmp_path / "out"
    out.mkdir()
    (out / "dev_revised.json").write_bytes(FAKE_DEV[:-5])
    assert fetch_redocred(out, files="dev", base_url=server.url)[0].status == "downloaded"
    assert (out / "dev_revised.json").read_bytes() == FAKE_DEV


def test_lmrc_data_dir_copies_the_local_files_and_reports_the_others_missing(
    server, data_dir, monkeypatch, tmp_path
):
    monkeypatch.setenv("LMRC_DATA_DIR", str(data_dir))
    out = tmp_path / "out"
    train, dev, test = fetch_redocred(out)
    assert (dev.status, dev.verified, dev.source) == (
        "copied",
        True,
        str(data_dir / "redocred" / "dev_revised.json"),
    )
    assert (out / "dev_revised.json").read_bytes() == (
        data_dir / "redocred" / "dev_revised.json"
    ).read_bytes()
    for r in (train, test):
        assert (r.status, r.path, r.source) == ("missing", None, f"{REDOCRED_URL}/{r.name}")
    assert sorted(p.name for p in out.iterdir()) == ["dev_revised.json"]
    assert server.requests == []  # nothing was downloaded


def test_from_dir_holding_the_files_directly_is_checked_like_a_download(tmp_path, fake_dev_hash):
    local = tmp_path / "copy"
    local.mkdir()
    (local / "dev_revised.json").write_bytes(FAKE_DEV)
    (local / "train_revised.json").write_bytes(FAKE_TRAIN)
    out = tmp_path / "out"
    results = fetch_redocred(out, files="train,dev", from_dir=local)
    assert [(r.name, r.status, r.verified) for r in results] == [
        ("train_revised.json", "copied", False),
        ("dev_revised.json", "copied", True),
    ]
    (local / "dev_revised.json").write_bytes(b"[]")
    with pytest.raises(LmrcError, match=r"copy/dev_revised\.json: sha256 mismatch: expected "):
        fetch_redocred(tmp_path / "out2", files="dev", from_dir=local)
    assert list((tmp_path / "out2").iterdir()) == []


def test_explicit_url_wins_over_lmrc_data_dir(server, monkeypatch, tmp_path):
    monkeypatch.setenv("LMRC_DATA_DIR", str(tmp_path / "nowhere"))
    (server.root / "train_revised.json").write_bytes(FAKE_TRAIN)
    (result,) = fetch_redocred(tmp_path / "out", files="train", base_url=server.url)
    assert result.status == "downloaded"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"files": "dev,valid"}, "--files 'dev,valid': choose from train, dev, test"),
        (
            {"from_dir": "x", "base_url": "http://h"},
            "give either a local copy (--from) or a download URL (--url), not both",
        ),
        (
            {"base_url": "ftp://h/data", "files": "dev"},
            "ftp://h/data/dev_revised.json: only http(s) URLs can be downloaded",
        ),
    ],
)
def test_bad_fetch_options_are_refused(tmp_path, kwargs, message):
    with pytest.raises(LmrcError) as exc:
        fetch_redocred(tmp_path / "out", **kwargs)
    assert str(exc.value).startswith(message)


def test_fetch_command_downloads_and_reports_each_file(server, capsys, tmp_path, fake_dev_hash):
    (server.root / "dev_revised.json").write_bytes(FAKE_DEV)
    out = tmp_path / "out"
    code = main(["data", "fetch", "redocred", "--to", str(out), "--url", server.url, "--files", "dev"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert stdout == f"dev_revised.json: downloaded -> {out / 'dev_revised.json'}  [sha256 verified]\n"


def test_fetch_command_from_a_partial_copy_exits_1_naming_where_to_get_the_rest(
    capsys, tmp_path, fake_dev_hash
):
    local = tmp_path / "copy" / "redocred"
    local.mkdir(parents=True)
    (local / "dev_revised.json").write_bytes(FAKE_DEV)
    code = main(
        ["data", "fetch", "redocred", "--to", str(tmp_path / "out"), "--from", str(tmp_path / "copy")]
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert (
        lines[0]
        == f"train_revised.json: missing from the local copy; get it from {REDOCRED_URL}/train_revised.json"
    )
    assert lines[1].startswith("dev_revised.json: copied -> ")
    assert (
        lines[2]
        == f"test_revised.json: missing from the local copy; get it from {REDOCRED_URL}/test_revised.json"
    )


def test_default_cache_root_is_home_cache_lmrc(monkeypatch, tmp_path):
    monkeypatch.delenv("LMRC_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fetch.cache_root() == tmp_path / ".cache" / "lmrc"

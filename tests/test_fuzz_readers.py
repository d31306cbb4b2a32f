"""Property tests: malformed documents, result files, candidates, relation inventories and configs given to the
readers either load or fail with one `LmrcError` that names the file; never another exception (a traceback)."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmrc.errors import LmrcError

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

VALID_DOC = {
    "title": "Doc",
    "sents": [["Alice", "met", "Bob", "."], ["Bob", "lives", "in", "Paris", "."]],
    "vertexSet": [
        [{"name": "Alice", "sent_id": 0, "pos": [0, 1], "type": "PER"}],
        [
            {"name": "Bob", "sent_id": 0, "pos": [2, 3], "type": "PER"},
            {"name": "Bob", "sent_id": 1, "pos": [0, 1], "type": "PER"},
        ],
        [{"name": "Paris", "sent_id": 1, "pos": [3, 4], "type": "LOC"}],
    ],
    "labels": [{"h": 1, "t": 2, "r": "P551", "evidence": [1]}],
}
VALID_PRED = [{"title": "Doc", "h_idx": 1, "t_idx": 2, "r": "P551", "evidence": [1]}]
VALID_REL_INFO = {"P551": "residence", "P17": "country"}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _paths(obj, prefix=()):
    """Every place in a JSON value: (path, value)."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw, valid):
    """`valid` with 1-3 places replaced by random JSON, deleted, or (rarely) the whole text cut short."""
    obj = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        places = list(_paths(obj))
        path, _ = places[draw(st.integers(0, len(places) - 1))]
        value = draw(json_values)
        if not path:
            obj = value
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    text = json.dumps(obj)
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text


def _check(path: Path, read) -> None:
    try:
        read(path)
    except LmrcError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"


def _write(text: str | bytes, suffix: str = ".json") -> Path:
    folder = Path(tempfile.mkdtemp(prefix="lmrc-fuzz-"))
    path = folder / f"input{suffix}"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def relations():
    from lmrc.data.relations import load_relations

    return load_relations(_write(json.dumps(VALID_REL_INFO)))


@FAST
@given(text=mutated([VALID_DOC, VALID_DOC | {"title": "Other"}]))
def test_documents(text, relations):
    from lmrc.data.docred import load_documents, load_labelled

    path = _write(text)
    _check(path, lambda p: load_documents(p, relations))
    _check(path, lambda p: load_labelled(p, None))


@FAST
@given(text=mutated(VALID_PRED))
def test_result_files(text):
    from lmrc.eval.metrics import load_predictions

    _check(_write(text), load_predictions)


@FAST
@given(text=mutated(VALID_REL_INFO))
def test_relation_inventories(text):
    from lmrc.data.relations import load_relations

    _check(_write(text), load_relations)


@pytest.fixture(scope="module")
def valid_candidates() -> dict:
    from lmrc.data.candidates import load_candidates

    folder = Path(tempfile.mkdtemp(prefix="lmrc-fuzz-"))
    raw = {
        "format": "lmrc-candidates",
        "version": 1,
        "header": {"model": "m", "head": "atl", "threshold": 0.0, "calibration": {"method": "default"}},
        "documents": [
            {
                "title": "Doc",
                "n_entities": 3,
                "pairs": [{"h": 1, "t": 2, "score": 0.9, "relations": {"P551": 0.5}, "top": {"P17": 0.1}}],
            }
        ],
    }
    path = folder / "c.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    load_candidates(path)  # the template itself is valid
    return raw


def test_candidates(valid_candidates):
    from lmrc.data.candidates import load_candidates

    @FAST
    @given(text=mutated(valid_candidates))
    def run(text):
        _check(_write(text), load_candidates)

    run()


yaml_text = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda k, v: f"{k}: {v}\n",
        st.sampled_from(["model", "train", "loss", "data", "output_dir", "train.epochs", "1", "[a]"]),
        st.text(max_size=20),
    ),
    st.sampled_from(
        [
            "train:\n  epochs: 2020-13-45\n",
            "train: {epochs: [1, 2]}\n",
            "? [a, b]\n: 1\n",
            "1: 2\nmodel: x\n",
            "a: &x [*x]\n",
            "[" * 200 + "]" * 200,
            "train:\n  epochs: .inf\n",
            "loss: {name: 3}\n",
            "model:\n  encoder: !!python/object:os.system ls\n",
        ]
    ),
)


@FAST
@given(text=yaml_text)
def test_stage1_configs(text):
    from lmrc.stage1.config import load_stage1_config

    _check(_write(text, ".yaml"), lambda p: load_stage1_config(p, []))


@FAST
@given(text=yaml_text)
def test_predict_configs(text):
    from lmrc.config import load_config
    from lmrc.predict.config import PredictConfig

    _check(_write(text, ".yaml"), lambda p: load_config(PredictConfig, p, []))


@FAST
@given(data=st.binary(max_size=60))
def test_undecodable_bytes(data):
    """Any bytes (invalid UTF-8 included) as a config or a document file: read, or one line naming the file."""
    from lmrc.config import read_yaml
    from lmrc.data.docred import load_documents

    _check(_write(data, ".yaml"), read_yaml)
    _check(_write(data), load_documents)

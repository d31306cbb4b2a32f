"""Stage-1 candidate proposal: candidates files from unlabelled documents, thresholds (head rule, recall target,
top-K), cross-fitting, and checkpoints that must be refused with one clear line.

A tiny random BERT (2 layers, 32-d) with the real MiniLM tokenizer, trained for a few steps on short real
Re-DocRED documents; reference scores are recomputed from the loaded checkpoint, independently of predict().
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from stage1_run_helpers import (
    one_entity_doc,
    save_tiny_bert,
    shortest,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_config,
    write_docs,
)

from lmrc.cli import main
from lmrc.data.candidates import load_candidates
from lmrc.data.docred import load_documents
from lmrc.data.split import fold_indices
from lmrc.errors import LmrcError
from lmrc.eval.metrics import load_predictions
from lmrc.stage1.calibration import calibrate_recall
from lmrc.stage1.checkpoint import load_checkpoint
from lmrc.stage1.config import CandidateSettings
from lmrc.stage1.crossfit import crossfit
from lmrc.stage1.features import featurize
from lmrc.stage1.inference import infer_logits
from lmrc.stage1.predict import predict
from lmrc.stage1.train import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory, dev_docs, redocred_dir, cache_dir):
    root = tmp_path_factory.mktemp("stage1-predict")
    docs = shortest(dev_docs, 8)
    files = {
        "encoder": save_tiny_bert(root / "tiny"),
        "train": write_docs(root / "train.json", docs[:4]),
        "tune": write_docs(root / "tune.json", docs[4:6]),
        "test": write_docs(root / "test.json", docs[6:8]),
        "unlabelled": write_docs(root / "unlabelled.json", docs[6:8], labels=False),
        "rel_info": redocred_dir / "rel_info.json",
        "root": root,
    }
    for head in ("atl", "bce"):
        config = tiny_config(
            files["encoder"],
            files["train"],
            files["tune"],
            files["rel_info"],
            root / head,
            f"loss.name={head}",
        )
        train(config)
        files[head] = root / head / "best"
    return files


def reference_scores(checkpoint_dir: Path, docs_path: Path) -> list[list[float]]:
    """Every pair's score straight from the model and the head, without predict()."""
    ck = load_checkpoint(checkpoint_dir)
    docs = load_documents(docs_path, ck.relations)
    logits = infer_logits(ck.model, [featurize(d, ck.tokenizer, ck.relations) for d in docs], 1, "cpu")
    return [ck.loss.score(lg).double().tolist() for lg in logits]


def test_predict_on_unlabelled_documents_writes_a_valid_candidates_file(setup, tmp_path):
    out, rel_out = tmp_path / "cands.json", tmp_path / "result.json"
    result = predict(setup["atl"], setup["unlabelled"], out, relations_output=rel_out)
    assert result.report is None  # no labels, no report
    cands = load_candidates(out)  # validates the schema
    docs = load_documents(setup["unlabelled"])
    assert [d.title for d in cands.documents] == [d.title for d in docs]
    assert cands.header.head == "atl" and cands.header.threshold == 0.0
    assert cands.header.calibration == {"method": "default"}
    for dc, doc, scores in zip(cands.documents, docs, reference_scores(setup["atl"], setup["unlabelled"])):
        pairs = doc.pairs()
        expected = sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: -scores[i])
        assert [(p.h, p.t) for p in dc.pairs] == [pairs[i] for i in expected]
        assert [p.score for p in dc.pairs] == pytest.approx([scores[i] for i in expected], abs=1e-5)
        assert dc.n_entities == len(doc.entities)
        # the relations of a candidate are exactly those with a positive margin; its score is the largest
        for p in dc.pairs:
            assert p.relations and all(m > 0 for m in p.relations.values())
            assert max(p.relations.values()) == pytest.approx(p.score, abs=1e-5)
    predictions = load_predictions(rel_out)
    candidate_pairs = {
        (dc.title, p.h, p.t, r) for dc in cands.documents for p in dc.pairs for r in p.relations
    }
    assert {(x["title"], x["h_idx"], x["t_idx"], x["r"]) for x in predictions} == candidate_pairs


def test_candidate_report_counts_pairs_with_a_relation(setup, tmp_path):
    result = predict(setup["atl"], setup["test"], tmp_path / "c.json")
    gold = load_documents(setup["test"])
    positive = {(d.title, h, t) for d in gold for (h, t) in d.relations_by_pair()}
    kept = {(dc.title, p.h, p.t) for dc in result.candidates.documents for p in dc.pairs}
    n_pairs = sum(len(d.pairs()) for d in gold)
    r = result.report
    assert (r.pairs, r.positive_pairs, r.candidates) == (n_pairs, len(positive), len(kept))
    assert r.recall == pytest.approx(len(kept & positive) / len(positive))
    assert r.reduction == pytest.approx(len(kept) / n_pairs)
    assert result.relation_metrics is not None  # multi-label head, labelled input


def test_calibrate_recall_picks_the_highest_threshold_reaching_the_target():
    scores = [[0.9, 0.1, 0.5], [0.3, 0.7]]
    gold = [[True, False, True], [True, False]]  # positive scores 0.9, 0.5, 0.3
    # 2 of 3 positives needed: keep 0.9 and 0.5; any threshold in [0.3, 0.5) works -> midpoint 0.4
    cal = calibrate_recall(scores, gold, 2 / 3)
    assert cal["threshold"] == pytest.approx(0.4)
    assert (cal["recall"], cal["candidates"], cal["pairs"]) == (pytest.approx(2 / 3), 3, 5)
    assert calibrate_recall(scores, gold, 0.5)["threshold"] == pytest.approx(0.4)  # ceil(1.5) = 2
    assert calibrate_recall(scores, gold, 1.0)["threshold"] == pytest.approx(0.2)  # between 0.3 and 0.1
    assert calibrate_recall(scores, gold, 1 / 3)["threshold"] == pytest.approx(0.8)  # between 0.9 and 0.7
    with pytest.raises(LmrcError, match="no positive pair"):
        calibrate_recall([[0.2]], [[False]], 0.9)


def _recall(target: float, calibration) -> CandidateSettings:
    return CandidateSettings(recall_target=target, calibration=str(calibration))


def test_recall_target_calibration_reaches_the_target_on_the_tune_docs(setup, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup["atl"], ckpt)
    before = {p.name: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    saved = tmp_path / "cal.json"
    result = predict(
        ckpt,
        setup["tune"],
        tmp_path / "c.json",
        CandidateSettings(recall_target=0.9, tune=str(setup["tune"])),
        save_calibration_path=saved,
    )
    assert result.report.recall >= 0.9
    # predict leaves the checkpoint folder byte-identical; the calibration goes to the header and the named file
    assert {p.name: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    assert result.candidates.header.calibration["threshold"] == result.threshold
    stored = json.loads(saved.read_text())
    assert stored["threshold"] == result.threshold and stored["target"] == 0.9
    # highest: one positive pair fewer (the threshold at the k-th positive score) misses the target
    scores = reference_scores(ckpt, setup["tune"])
    docs = load_documents(setup["tune"])
    pos = sorted(
        (
            s
            for d, sc in zip(docs, scores)
            for (pair, s) in zip(d.pairs(), sc)
            if pair in d.relations_by_pair()
        ),
        reverse=True,
    )
    k = sum(s > result.threshold for s in pos)
    assert (k - 1) / len(pos) < 0.9 <= k / len(pos)
    # the saved calibration is reused with --calibration; another target or other weights are refused
    again = predict(ckpt, setup["test"], tmp_path / "c2.json", _recall(0.9, saved))
    assert again.threshold == result.threshold
    assert again.candidates.header.calibration["method"] == "recall_target"
    with pytest.raises(LmrcError, match="calibrated for recall target 0.9, not 0.8"):
        predict(ckpt, setup["test"], tmp_path / "c3.json", _recall(0.8, saved))
    with pytest.raises(LmrcError, match="pass --tune FILE"):
        predict(ckpt, setup["test"], tmp_path / "c3.json", CandidateSettings(recall_target=0.9))
    with pytest.raises(LmrcError, match="calibrated for other weights"):
        predict(setup["bce"], setup["test"], tmp_path / "c4.json", _recall(0.9, saved))


def test_max_per_doc_keeps_the_k_best_pairs(setup, tmp_path):
    result = predict(setup["atl"], setup["unlabelled"], tmp_path / "c.json", CandidateSettings(max_per_doc=3))
    assert result.candidates.header.threshold is None
    assert result.candidates.header.calibration == {"method": "max_per_doc", "k": 3}
    for dc, scores in zip(result.candidates.documents, reference_scores(setup["atl"], setup["unlabelled"])):
        assert [p.score for p in dc.pairs] == pytest.approx(sorted(scores, reverse=True)[:3], abs=1e-5)


def test_bce_head_scores_are_probabilities_with_the_half_rule(setup, tmp_path):
    result = predict(setup["bce"], setup["test"], tmp_path / "c.json")
    assert result.threshold == 0.5 and result.relation_metrics is None
    for dc, scores in zip(result.candidates.documents, reference_scores(setup["bce"], setup["test"])):
        assert len(dc.pairs) == sum(s > 0.5 for s in scores)
        assert all(0.5 < p.score <= 1.0 and p.relations is None for p in dc.pairs)
    with pytest.raises(LmrcError, match="predicts no relations"):
        predict(setup["bce"], setup["test"], tmp_path / "c.json", relations_output=tmp_path / "r.json")


def test_a_document_with_one_entity_gets_no_pairs(setup, tmp_path, dev_docs):
    raws = json.loads(setup["unlabelled"].read_text()) + [one_entity_doc(dev_docs[0])]
    raws[-1].pop("labels")
    path = tmp_path / "docs.json"
    path.write_text(json.dumps(raws))
    cands = predict(setup["atl"], path, tmp_path / "c.json").candidates
    single = cands.documents[-1]
    assert single.n_entities == 1 and single.pairs == ()
    assert len(cands.documents[0].pairs) > 0


def _predict_cli(ckpt: Path, docs: Path, out: Path, capsys) -> tuple[int, list[str]]:
    """`lmrc stage1 predict` through the CLI: (exit code, stderr lines)."""
    code = main(["stage1", "predict", "--checkpoint", str(ckpt), "--input", str(docs), "--output", str(out)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_checkpoint_with_another_encoder_config_fails_with_one_line(setup, tmp_path, capsys):
    from transformers import BertConfig

    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup["atl"], ckpt)
    BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=2).save_pretrained(
        ckpt / "encoder"
    )
    with pytest.raises(
        LmrcError, match=r"encoder config does not match .*hidden_size = 48.* trained with 32"
    ):
        load_checkpoint(ckpt)
    # the record in stage1.json edited to agree: the weights themselves still refuse
    meta = json.loads((ckpt / "stage1.json").read_text())
    meta["encoder"]["hidden_size"] = 48
    (ckpt / "stage1.json").write_text(json.dumps(meta))
    code, err = _predict_cli(ckpt, setup["test"], tmp_path / "c.json", capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("lmrc: error:") and "weights do not match the encoder config" in err[0]


def test_a_checkpoint_with_an_unknown_loss_fails_with_one_line(setup, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup["atl"], ckpt)
    meta = json.loads((ckpt / "stage1.json").read_text())
    meta["loss"]["name"] = "focal"
    (ckpt / "stage1.json").write_text(json.dumps(meta))
    code, err = _predict_cli(ckpt, setup["test"], tmp_path / "c.json", capsys)
    assert code == 2 and len(err) == 1
    assert "stage1.json: loss.name: unknown loss 'focal'" in err[0]


def test_crossfit_proposes_each_document_with_the_model_that_did_not_see_it(setup, tmp_path):
    config = tiny_config(
        setup["encoder"], setup["train"], setup["tune"], setup["rel_info"], tmp_path / "cf", "train.epochs=1"
    )
    result = crossfit(config, 2, tmp_path / "cands.json")
    cands = load_candidates(tmp_path / "cands.json")
    docs = load_documents(setup["train"])
    assert [d.title for d in cands.documents] == [d.title for d in docs]
    info = cands.header.calibration["crossfit"]
    assert info["folds"] == 2 and len(info["fold_models"]) == 2
    for k, held in enumerate(fold_indices(len(docs), 2, config.data.fold_seed)):
        fold_cfg = (tmp_path / "cf" / f"fold{k}" / "config.yaml").read_text()
        assert "holdout_fold: " + str(k) in fold_cfg
        # fold k's model scores its held-out documents exactly as the candidates say
        fold_docs = tmp_path / f"held{k}.json"
        write_docs(fold_docs, [docs[i] for i in held])
        for i, scores in zip(held, reference_scores(tmp_path / "cf" / f"fold{k}" / "best", fold_docs)):
            assert len(cands.documents[i].pairs) == sum(s > 0 for s in scores)
    assert result.report.documents == len(docs)


def test_head_params_change_prediction_only_and_refuse_training_parameters(setup, tmp_path):
    """--head-param top_k=1 caps ATL at one relation per pair; a training-only parameter is refused."""
    plain = predict(
        setup["atl"], setup["test"], tmp_path / "a.json", relations_output=tmp_path / "a.result.json"
    )
    capped = predict(
        setup["atl"],
        setup["test"],
        tmp_path / "b.json",
        CandidateSettings(head_params={"top_k": 1}),
        relations_output=tmp_path / "b.result.json",
    )
    per_pair: dict = {}
    for x in capped.relation_predictions:
        per_pair[(x["title"], x["h_idx"], x["t_idx"])] = (
            per_pair.get((x["title"], x["h_idx"], x["t_idx"]), 0) + 1
        )
    assert per_pair and max(per_pair.values()) == 1
    capped_set = {(x["title"], x["h_idx"], x["t_idx"], x["r"]) for x in capped.relation_predictions}
    plain_set = {(x["title"], x["h_idx"], x["t_idx"], x["r"]) for x in plain.relation_predictions}
    assert capped_set <= plain_set
    with pytest.raises(LmrcError, match="not a prediction-time parameter"):
        load_checkpoint(setup["atl"], head_params={"lam": 2.0})

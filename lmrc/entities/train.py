"""`lmrc entities train`: the mention tagger (epochs, resumable per epoch), then the coreference scorer.

Training examples come from DocRED-format files turned into text (`detok`) and segmented as text input is, so
the tagger learns on the tokens it will see. Gold mentions are aligned to those tokens; the tagger's best epoch on
the tuning file (typed mention F1) is kept. The pair scorer is then fitted on the gold mentions and clusters, with
the tagger's word vectors, and its linking threshold is chosen on the tuning file for the CoNLL F1.

State after every epoch is in `<output>/state/` (tagger weights, optimizer, counters); `--resume` continues after
the last finished epoch and gives the same model as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmrc.config import save_config, to_dict
from lmrc.data.docred import Document, load_documents
from lmrc.entities.annotate import TokenMention, align_span, gold_of
from lmrc.entities.config import EntitiesConfig
from lmrc.entities.coref import PairScorer, link, pair_matrix, train_scorer
from lmrc.entities.mentions import (
    bio_labels,
    collate,
    decode_bio,
    encode_window,
    plan_windows,
    tag_document,
    window_labels,
)
from lmrc.entities.metrics import EntityScores
from lmrc.entities.model import EntityModel, mention_infos, typed_clusters
from lmrc.entities.segment import Segmented, segment
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, read_json, write_dir_atomically
from lmrc.training import length_grouped_batches

log = logging.getLogger(__name__)

STATE_DIR = "state"
BEST_DIR = "best_tagger"


@dataclass
class Example:
    """A training document as the tagger sees text: segmented, with its gold mentions on those tokens."""

    title: str
    seg: Segmented
    mentions: list[TokenMention]  # gold, aligned
    cluster_ids: list[int]  # gold entity of each mention
    gold: list[list[tuple[tuple[int, int], str]]]  # gold entities as (char span, type), for scoring


def make_example(doc: Document) -> Example:
    g = gold_of(doc)
    seg = segment(g.text)
    mentions, ids = [], []
    for ei, ent in enumerate(g.entities):
        for m in ent:
            al = align_span(seg, m.span)
            if al is not None:
                mentions.append(TokenMention(al[0], al[1], al[2], m.type))
                ids.append(ei)
    order = sorted(range(len(mentions)), key=lambda i: (mentions[i].sent, mentions[i].start, mentions[i].end))
    gold = [[(m.span, m.type) for m in ent] for ent in g.entities]
    return Example(doc.title, seg, [mentions[i] for i in order], [ids[i] for i in order], gold)


def _types(docs: list[Document]) -> list[str]:
    types = sorted({m.type for d in docs for e in d.entities for m in e.mentions if m.type})
    if not types:
        raise LmrcError("entities train: the training file has no mention types")
    return types


def _load(path: str, role: str, max_docs: int) -> list[Document]:
    if not path:
        raise LmrcError(f"entities train: data.{role} is not set (a DocRED-format file)")
    docs = load_documents(path)
    if not docs:
        raise LmrcError(f"{path}: no documents")
    return docs[:max_docs] if max_docs > 0 else docs


def predict_entities(model: EntityModel, seg: Segmented) -> list[list[tuple[tuple[int, int], str]]]:
    """The model's entities as (char span, type) mentions."""
    out = []
    for ent in model.find(seg):
        out.append(
            [((seg.sents[m.sent][m.start].start, seg.sents[m.sent][m.end - 1].end), m.type) for m in ent]
        )
    return out


def mention_f1(tagger, tokenizer, labels: list[str], max_tokens: int, examples: list[Example]) -> float:
    tp = n_pred = n_gold = 0
    for ex in examples:
        logp, _ = tag_document(tagger, tokenizer, ex.seg.words(), max_tokens)
        pred = set()
        for si, row in enumerate(logp):
            pred.update(decode_bio([labels[int(x.argmax())] for x in row], si))
        gold = set(ex.mentions)
        tp += len(pred & gold)
        n_pred += len(pred)
        n_gold += len(gold)
    p, r = tp / max(n_pred, 1), tp / max(n_gold, 1)
    return 2 * p * r / (p + r) if p + r else 0.0


def _coref_data(tagger, tokenizer, max_tokens: int, examples: list[Example]):
    data = []
    for ex in examples:
        _, vecs = tag_document(tagger, tokenizer, ex.seg.words(), max_tokens)
        data.append((mention_infos(ex.seg, ex.mentions, vecs), ex.cluster_ids))
    return data


def _save_state(folder: Path, tagger, tokenizer, optimizer, counters: dict) -> None:
    from safetensors.torch import save_file

    from lmrc.stage1.checkpoint import _split_optimizer_state

    def write(tmp: Path) -> None:
        tagger.save_pretrained(tmp / "tagger", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "tagger")
        tensors, opt_json = _split_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / "optimizer.json", opt_json)
        atomic_write_json(tmp / "trainer.json", counters, indent=1)

    write_dir_atomically(folder, write)


def train(
    cfg: EntitiesConfig,
    output_dir: str | Path | None = None,
    resume: bool = False,
    stop_after_epochs: int = 0,
) -> Path:
    """Train (or continue) the entity model; returns the checkpoint folder (= the output folder).

    First the BIO mention tagger, one resumable epoch at a time (the best epoch on the tuning file is kept), then
    the mention-pair coreference scorer on the best tagger and its clustering threshold on the tuning file.
    `stop_after_epochs` > 0 stops after that many epochs of this call, with the state saved (tests, time-boxed
    jobs; then `resume`)."""
    out = Path(output_dir or cfg.output_dir)
    _check_run_folder(cfg, out, resume)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()
    train_docs = _load(cfg.data.train, "train", cfg.data.max_docs)
    tune_docs = _load(cfg.data.tune, "tune", cfg.data.max_docs)
    labels = bio_labels(_types(train_docs))
    train_ex = [make_example(d) for d in train_docs]
    tune_ex = [make_example(d) for d in tune_docs]
    log.info(
        "entities train: %d training and %d tuning documents, labels %s", len(train_ex), len(tune_ex), labels
    )
    run = _TaggerRun.start(cfg, out, labels, train_ex, resume)
    for k, epoch in enumerate(range(run.counters["epoch"] + 1, cfg.train.epochs + 1)):
        if stop_after_epochs and k >= stop_after_epochs:
            raise KeyboardInterrupt
        run.train_epoch(epoch, tune_ex)
    return _finish(cfg, out, run, labels, train_ex, tune_ex, t0)


def _check_run_folder(cfg: EntitiesConfig, out: Path, resume: bool) -> None:
    """A new run needs a folder without one; --resume needs the same config as the interrupted run."""
    if not resume and any((out / name).exists() for name in (STATE_DIR, "entities.json", "config.yaml")):
        raise LmrcError(
            f"{out}: holds an entity-model run (continue it with --resume, or choose another folder)"
        )
    if resume and (out / "config.yaml").is_file():
        saved = read_json_yaml(out / "config.yaml")
        if saved != json.loads(json.dumps(to_dict(cfg))):
            raise LmrcError(f"{out}: --resume with a different config than {out / 'config.yaml'}")


@dataclass
class _TaggerRun:
    """The mention tagger being trained: model, tokenizer, its training windows, optimizer and counters (epoch,
    step, best tuning F1, history), saved after every epoch so that --resume continues after the last one."""

    cfg: EntitiesConfig
    out: Path
    tagger: Any
    tokenizer: Any
    labels: list[str]
    window_cap: int
    rows: list
    optimizer: Any
    counters: dict

    @classmethod
    def start(
        cls, cfg: EntitiesConfig, out: Path, labels: list[str], train_ex: list, resume: bool
    ) -> _TaggerRun:
        from safetensors.torch import load_file
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        from lmrc.model_store import resolve
        from lmrc.stage1.checkpoint import _join_optimizer_state

        tc, state_dir = cfg.train, out / STATE_DIR
        resuming = resume and (state_dir / "trainer.json").is_file()
        start_from = state_dir / "tagger" if resuming else resolve(cfg.model.encoder)
        tokenizer = AutoTokenizer.from_pretrained(start_from, trust_remote_code=False)
        torch.manual_seed(tc.seed)
        tagger = AutoModelForTokenClassification.from_pretrained(
            start_from, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)}, trust_remote_code=False,
        )  # fmt: skip
        window_cap = min(tc.max_tokens, int(getattr(tagger.config, "max_position_embeddings", tc.max_tokens)))
        rows = _training_windows(train_ex, tokenizer, window_cap, labels)
        no_decay = ("bias", "LayerNorm")
        decay = [p for n, p in tagger.named_parameters() if not any(k in n for k in no_decay)]
        other = [p for n, p in tagger.named_parameters() if any(k in n for k in no_decay)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=tc.lr,
        )
        counters = {"epoch": 0, "step": 0, "best_f1": -1.0, "best_epoch": 0, "history": []}
        if resuming:
            counters = read_json(state_dir / "trainer.json")
            optimizer.load_state_dict(
                _join_optimizer_state(
                    load_file(str(state_dir / "optimizer.safetensors")),
                    read_json(state_dir / "optimizer.json"),
                )
            )
            log.info("%s: resuming after epoch %d", out, counters["epoch"])
        return cls(cfg, out, tagger, tokenizer, labels, window_cap, rows, optimizer, counters)

    def _lr(self, step: int) -> float:
        """Linear warmup over warmup_ratio of the steps, then linear decay to 0."""
        tc = self.cfg.train
        total = math.ceil(len(self.rows) / tc.batch_size) * tc.epochs
        warmup = int(tc.warmup_ratio * total)
        if step < warmup:
            return tc.lr * step / max(warmup, 1)
        return tc.lr * max(0.0, (total - step) / max(total - warmup, 1))

    def train_epoch(self, epoch: int, tune_ex: list) -> None:
        """One epoch over the length-grouped windows, then the tuning mention F1, the best tagger and the state."""
        tc, counters, tagger = self.cfg.train, self.counters, self.tagger
        tagger.train()
        torch.manual_seed(tc.seed * 1000 + epoch)
        batches = length_grouped_batches([len(r[0]) for r in self.rows], tc.batch_size, seed=tc.seed + epoch)
        e0, loss_sum = time.perf_counter(), 0.0
        pad = self.tokenizer.pad_token_id or 0
        for bi, batch in enumerate(batches):
            for g in self.optimizer.param_groups:
                g["lr"] = self._lr(counters["step"])
            ids, mask, labs = collate([self.rows[i] for i in batch], pad)
            loss = tagger(input_ids=ids, attention_mask=mask, labels=labs).loss
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tagger.parameters(), 1.0)
            self.optimizer.step()
            counters["step"] += 1
            loss_sum += float(loss.detach())
            if (bi + 1) % 20 == 0:
                log.info("epoch %d step %d/%d loss %.4f", epoch, bi + 1, len(batches), loss_sum / (bi + 1))
        tagger.eval()
        f1 = mention_f1(tagger, self.tokenizer, self.labels, self.window_cap, tune_ex)
        mean_loss = loss_sum / max(len(batches), 1)
        counters["history"].append({"epoch": epoch, "loss": mean_loss, "tune_mention_f1": f1,
                                    "seconds": round(time.perf_counter() - e0, 1)})  # fmt: skip
        log.info("epoch %d: loss %.4f, tune mention F1 %.4f (%.0f s)", epoch, mean_loss, f1,
                 time.perf_counter() - e0)  # fmt: skip
        if f1 > counters["best_f1"]:
            counters["best_f1"], counters["best_epoch"] = f1, epoch
            write_dir_atomically(self.out / BEST_DIR, lambda tmp: (tagger.save_pretrained(tmp, safe_serialization=True),
                                                                    self.tokenizer.save_pretrained(tmp)))  # fmt: skip
        counters["epoch"] = epoch
        _save_state(self.out / STATE_DIR, tagger, self.tokenizer, self.optimizer, counters)


def _training_windows(train_ex: list, tokenizer: Any, window_cap: int, labels: list[str]) -> list:
    """(token ids, first word-piece of each word, BIO label ids) for every encoder-size window of every document."""
    label_ids = {lab: i for i, lab in enumerate(labels)}
    rows = []
    for ex in train_ex:
        words = ex.seg.words()
        for w in plan_windows(words, tokenizer, window_cap):
            ids, first = encode_window(tokenizer, words, w, window_cap)
            rows.append((ids, first, window_labels(w, ex.mentions, label_ids)))
    return rows


def _finish(
    cfg: EntitiesConfig,
    out: Path,
    run: _TaggerRun,
    labels: list[str],
    train_ex: list,
    tune_ex: list,
    t0: float,
) -> Path:
    """The coreference scorer on the best tagger, its threshold on the tuning file, and the checkpoint folder."""
    from transformers import AutoModelForTokenClassification

    best = AutoModelForTokenClassification.from_pretrained(out / BEST_DIR, trust_remote_code=False)
    best.eval()
    tokenizer, window_cap = run.tokenizer, run.window_cap
    log.info("coreference: pair features of %d training documents", len(train_ex))
    scorer = train_scorer(
        _coref_data(best, tokenizer, window_cap, train_ex),
        cfg.coref.hidden,
        cfg.coref.steps,
        cfg.coref.lr,
        cfg.train.seed,
    )
    threshold, tune_scores = tune_threshold(
        scorer, best, tokenizer, window_cap, tune_ex, cfg.coref.thresholds
    )
    model = EntityModel(best, tokenizer, labels, window_cap, scorer, threshold)
    e2e = EntityScores.empty()
    for ex in tune_ex:
        e2e.add(ex.gold, predict_entities(model, ex.seg))
    summary = {
        "encoder": cfg.model.encoder,
        "best_epoch": run.counters["best_epoch"],
        "history": run.counters["history"],
        "coref_threshold": threshold,
        "tune_gold_mentions": tune_scores,
        "tune": e2e.report(),
        "train_documents": len(train_ex),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    # The checkpoint files go in last; entities.json (written last of all) marks the folder complete.
    model.save(out, {"training": summary})
    atomic_write_json(out / "train_summary.json", summary, indent=1)
    shutil.rmtree(out / BEST_DIR, ignore_errors=True)
    return out


def read_json_yaml(path: Path) -> dict:
    from lmrc.config import read_yaml

    return json.loads(json.dumps(read_yaml(path)))


def tune_threshold(scorer: PairScorer, tagger, tokenizer, max_tokens, examples: list[Example], grid):
    """The linking threshold with the best CoNLL F1 on the tuning documents' gold mentions."""
    data = _coref_data(tagger, tokenizer, max_tokens, examples)
    feats = []
    for infos, _ in data:
        x, pairs = pair_matrix(infos)
        with torch.no_grad():
            feats.append((pairs, torch.sigmoid(scorer(x)).tolist() if pairs else []))
    best = (-1.0, 0.5, {})
    for thr in grid:
        s = EntityScores.empty()
        for ex, (infos, _), (pairs, probs) in zip(examples, data, feats):
            groups = link(len(infos), pairs, probs, thr)
            ents = typed_clusters(ex.mentions, groups)
            pred = [[(_span(ex.seg, m), m.type) for m in e] for e in ents]
            gold = [[(_span(ex.seg, m), m.type) for m, c in zip(ex.mentions, ex.cluster_ids) if c == k]
                    for k in sorted(set(ex.cluster_ids))]  # fmt: skip
            s.add(gold, pred)
        rep = s.report()
        if rep["conll_f1"] > best[0]:
            best = (rep["conll_f1"], float(thr), rep)
    log.info("coreference threshold %.2f: tune CoNLL F1 %.4f on gold mentions", best[1], best[0])
    return best[1], best[2]


def _span(seg: Segmented, m: TokenMention) -> tuple[int, int]:
    return seg.sents[m.sent][m.start].start, seg.sents[m.sent][m.end - 1].end

"""`lmrc entities train`: the mention tagger (epochs, resumable per epoch), then the coreference scorer.

Training examples come from DocRED-format files turned into text and segmented as text input is (examples.py).
The tagger's best epoch on the tuning file (typed mention F1) is kept. The pair scorer is then fitted on the gold
mentions and clusters, with the tagger's word vectors, and its linking threshold is chosen on the tuning file for
the CoNLL F1.

State after every epoch is in `<output>/state/` (tagger weights, optimizer, counters in `trainer.json`);
`--resume` continues after the last finished epoch and gives the same model as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from lmrc.config import save_config
from lmrc.entities.config import EntitiesConfig
from lmrc.entities.coref import train_scorer
from lmrc.entities.examples import Example, load_split, make_example, mention_types, training_windows
from lmrc.entities.mentions import bio_labels, collate
from lmrc.entities.metrics import EntityScores
from lmrc.entities.model import META_FILE, EntityModel
from lmrc.entities.tuning import coref_data, mention_f1, predict_entities, tune_threshold
from lmrc.io import atomic_write_json
from lmrc.models.store import resolve
from lmrc.progress import Progress
from lmrc.training.run_folder import (
    CONFIG_FILE,
    ResumeState,
    check_same_config,
    open_run,
    publish,
    read_resume_state,
    read_saved_config,
    write_resume_state,
)
from lmrc.training.schedule import length_grouped_batches

log = logging.getLogger(__name__)

STATE_DIR = "state"
POSITION_FILE = "trainer.json"  # the tagger's counters in state/
BEST_DIR = "best_tagger"
# Config keys that may differ between a run and its `--resume` without changing what is computed.
RESUMABLE_CHANGES = ("output_dir",)


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
    cfg = dataclasses.replace(cfg, output_dir=str(out))  # the saved config names the folder it is in
    markers = [out / STATE_DIR, out / META_FILE, out / CONFIG_FILE]
    resuming = open_run(out, resume, state_file=out / STATE_DIR / POSITION_FILE, markers=markers,
                        what="an entity-model run")  # fmt: skip
    if resuming:
        check_same_config(read_saved_config(EntitiesConfig, out), cfg, out / CONFIG_FILE, RESUMABLE_CHANGES)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / CONFIG_FILE)
    t0 = time.perf_counter()
    train_docs = load_split(cfg.data.train, "train", cfg.data.max_docs)
    tune_docs = load_split(cfg.data.tune, "tune", cfg.data.max_docs)
    labels = bio_labels(mention_types(train_docs))
    train_ex = [make_example(d) for d in train_docs]
    tune_ex = [make_example(d) for d in tune_docs]
    log.info(
        "entities train: %d training and %d tuning documents, labels %s", len(train_ex), len(tune_ex), labels
    )
    run = TaggerRun.setup(cfg, out, labels, train_ex, resuming)
    for k, epoch in enumerate(range(run.counters["epoch"] + 1, cfg.train.epochs + 1)):
        if run.converged():  # also when resuming a run that had stopped early
            break
        if stop_after_epochs and k >= stop_after_epochs:
            raise KeyboardInterrupt
        run.train_epoch(epoch, tune_ex)
    if run.converged():
        log.info("entities train: no better tuning F1 for %d epochs; stopped after epoch %d (best: epoch %d)",
                 cfg.train.patience, run.counters["epoch"], run.counters["best_epoch"])  # fmt: skip
    if resuming and (out / META_FILE).is_file() and not (out / BEST_DIR).exists():
        log.info("%s: training had already finished", out)
        return out
    return fit_coreference(cfg, out, run, labels, train_ex, tune_ex, t0)


@dataclass
class TaggerRun:
    """The mention tagger being trained: model, tokenizer, its training windows, optimizer and counters (epoch,
    step, best tuning F1, history), saved after every epoch so that --resume continues after the last one."""

    cfg: EntitiesConfig
    out: Path
    tagger: Any
    tokenizer: Any
    labels: list[str]
    window_cap: int
    rows: list
    optimizer: torch.optim.Optimizer
    counters: dict

    @classmethod
    def setup(
        cls, cfg: EntitiesConfig, out: Path, labels: list[str], train_ex: list, resuming: bool
    ) -> TaggerRun:
        """The encoder with a fresh tagging head (or the saved tagger, optimizer and counters when resuming)."""
        tc, state_dir = cfg.train, out / STATE_DIR
        start_from = state_dir / "tagger" if resuming else resolve(cfg.model.encoder)
        tokenizer = AutoTokenizer.from_pretrained(start_from, trust_remote_code=False)
        torch.manual_seed(tc.seed)
        # a fresh tagging head on a sentence encoder: transformers' load report of the new head and the unused
        # pooler is expected, not news to the user; one line says it instead
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tagger = AutoModelForTokenClassification.from_pretrained(
                start_from, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={lab: i for i, lab in enumerate(labels)}, trust_remote_code=False,
            )  # fmt: skip
        finally:
            hf_logging.set_verbosity(level)
        if not resuming:
            log.info("entities train: a new tagging head (%d labels) on %s", len(labels), start_from)
        window_cap = min(tc.max_tokens, int(getattr(tagger.config, "max_position_embeddings", tc.max_tokens)))
        rows = training_windows(train_ex, tokenizer, window_cap, labels)
        no_decay = ("bias", "LayerNorm")
        decay = [p for n, p in tagger.named_parameters() if not any(k in n for k in no_decay)]
        other = [p for n, p in tagger.named_parameters() if any(k in n for k in no_decay)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=tc.lr,
        )
        counters = {"epoch": 0, "step": 0, "best_f1": -1.0, "best_epoch": 0, "history": []}
        if resuming:
            state = read_resume_state(state_dir, POSITION_FILE, parts=())
            counters = state.position
            optimizer.load_state_dict(state.optimizer)
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

    def train_epoch(self, epoch: int, tune_ex: list[Example]) -> None:
        """One epoch over the length-grouped windows, then the tuning mention F1, the best tagger and the state."""
        tc, counters, tagger = self.cfg.train, self.counters, self.tagger
        tagger.train()
        torch.manual_seed(tc.seed * 1000 + epoch)
        batches = length_grouped_batches([len(r[0]) for r in self.rows], tc.batch_size, seed=tc.seed + epoch)
        e0, loss_sum = time.perf_counter(), 0.0
        pad = self.tokenizer.pad_token_id or 0
        progress = Progress(len(batches), f"entities train: epoch {epoch}/{tc.epochs}", "step", logger=log)
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
            progress.update(1, loss=round(loss_sum / (bi + 1), 4))
        progress.close()
        tagger.eval()
        f1 = mention_f1(tagger, self.tokenizer, self.labels, self.window_cap, tune_ex)
        seconds = time.perf_counter() - e0
        mean_loss = loss_sum / max(len(batches), 1)
        counters["history"].append({"epoch": epoch, "loss": mean_loss, "tune_mention_f1": f1,
                                    "seconds": round(seconds, 1)})  # fmt: skip
        log.info("epoch %d: loss %.4f, tune mention F1 %.4f (%.0f s)", epoch, mean_loss, f1, seconds)
        if f1 > counters["best_f1"]:
            counters["best_f1"], counters["best_epoch"] = f1, epoch
            publish(self.out / BEST_DIR, self._save_tagger)
        counters["epoch"] = epoch
        self.save_state()

    def converged(self) -> bool:
        """`patience` epochs in a row without a better tuning mention F1."""
        c, patience = self.counters, self.cfg.train.patience
        return patience > 0 and c["epoch"] - c["best_epoch"] >= patience

    def _save_tagger(self, folder: Path) -> None:
        self.tagger.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)

    def save_state(self) -> None:
        """`state/`: the tagger, its optimizer and the counters, swapped in whole."""
        state = ResumeState(position=self.counters, optimizer=self.optimizer.state_dict())
        publish(
            self.out / STATE_DIR,
            lambda tmp: self._save_tagger(tmp / "tagger"),
            lambda tmp: write_resume_state(tmp, state, POSITION_FILE),
        )


def fit_coreference(
    cfg: EntitiesConfig,
    out: Path,
    run: TaggerRun,
    labels: list[str],
    train_ex: list,
    tune_ex: list,
    t0: float,
) -> Path:
    """The coreference scorer on the best tagger, its threshold on the tuning file, and the checkpoint folder."""
    best = AutoModelForTokenClassification.from_pretrained(out / BEST_DIR, trust_remote_code=False)
    best.eval()
    tokenizer, window_cap = run.tokenizer, run.window_cap
    log.info("coreference: pair features of %d training documents", len(train_ex))
    data = coref_data(best, tokenizer, window_cap, train_ex)
    scorer = train_scorer(data, cfg.coref.hidden, cfg.coref.steps, cfg.coref.lr, cfg.train.seed)
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

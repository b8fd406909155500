"""The tally: everything an evaluation's metrics need, kept as sums (integers where order would change
the digits) that ranks add with one all-reduce, plus the few examples each confusion keeps."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from signscale.evaluation.metrics import (
    ECE_BINS,
    NLL_CAP,
    NLL_SCALE,
    confusion_matrix,
    fixed,
    reliability_fixed,
    risk_coverage,
    unfixed,
)
from signscale.evaluation.robustness import BRIGHTNESS_BINS, bin_counts, brightness_bins
from signscale.training import distributed

TOP_K = 5
EXAMPLES_PER_CONFUSION = 4  # images kept per (true, predicted) pair, chosen by rank_of(id)
SKIP_EXAMPLES = 20  # skipped entries listed by name in the report


def rank_of(sample_id: int) -> int:
    """A fixed scramble of sample ids (Fibonacci hashing): which examples a report shows."""
    return (sample_id * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF


class Tally:
    def __init__(self, num_classes: int, n_conditions: int, n_countries: int, n_pairs: int,
                 n_sources: int = 1) -> None:
        c = num_classes
        self.num_classes = c
        self.confusion = np.zeros((c, c), dtype=np.int64)
        self.top5 = 0
        self.calibration_fixed = np.zeros((ECE_BINS, 3), dtype=np.int64)  # see CONF_SCALE
        self.nll_fixed = 0  # NLL_SCALE units
        # the same before the model's temperature and TTA (ECE before/after calibration)
        self.calibration_raw_fixed = np.zeros((ECE_BINS, 3), dtype=np.int64)
        self.nll_raw_fixed = 0
        # per sample, for selective prediction (a ranking, so not a sum): top log-probability, right or
        # wrong, and the id that breaks ties the same way whatever the batching
        self.scores: list[np.ndarray] = []
        self.hits: list[np.ndarray] = []
        self.score_ids: list[np.ndarray] = []
        self.conditions = np.zeros((n_conditions, 2), dtype=np.int64)  # (count, correct)
        self.countries = np.zeros((n_countries, 2), dtype=np.int64)
        self.sources = np.zeros((n_sources, 2), dtype=np.int64)
        self.corrupted = np.zeros((n_pairs, 2), dtype=np.int64)
        # the same by the clean image's brightness (robustness.brightness_bins), and clean for reference
        self.light_clean = np.zeros((BRIGHTNESS_BINS, 2), dtype=np.int64)
        self.light_corrupted = np.zeros((n_pairs, BRIGHTNESS_BINS, 2), dtype=np.int64)
        self.skips: Counter[str] = Counter()
        self.skip_examples: list[tuple[str, str, str]] = []
        self.unmapped: Counter[int] = Counter()  # data class id -> samples the model cannot score
        # (true, pred) -> [(id, key, image)] of lowest _rank; class -> (id, image) of a correct sample
        self.examples: dict[tuple[int, int], list[tuple[int, str, np.ndarray]]] = {}
        self.prototypes: dict[int, tuple[int, np.ndarray]] = {}
        self.seconds = 0.0
        self.corruption_seconds = 0.0

    @property
    def calibration(self) -> np.ndarray:
        return unfixed(self.calibration_fixed)

    def add(self, logp: torch.Tensor, labels: torch.Tensor, *, ids: np.ndarray, keep: np.ndarray,
            images: np.ndarray | None, meta: Mapping[str, np.ndarray], keys: Sequence[str] | None = None,
            logp_raw: torch.Tensor | None = None) -> None:
        """Add one batch of log-probabilities [B, C] for the rows ``keep`` (labels in the model's ids).

        ``logp`` is what is scored (with the model's temperature, and TTA when asked); ``logp_raw``
        the plain network at temperature 1, for the calibration's "before" (default: ``logp``).
        """
        if not keep.any():
            return
        rows = torch.from_numpy(np.flatnonzero(keep)).to(logp.device)
        logp = logp.index_select(0, rows).double()
        y = labels.to(logp.device).index_select(0, rows)
        conf, pred = logp.max(1)
        top = logp.topk(min(TOP_K, logp.shape[1]), dim=1).indices
        correct_t = pred == y
        self.top5 += int((top == y[:, None]).any(1).sum())
        nll = (-logp.gather(1, y[:, None])).clamp(max=NLL_CAP).cpu().numpy()
        self.nll_fixed += int(fixed(nll, NLL_SCALE).sum())
        y_np, pred_np, ok = y.cpu().numpy(), pred.cpu().numpy(), correct_t.cpu().numpy()
        self.confusion += confusion_matrix(y_np, pred_np, self.num_classes)
        self.calibration_fixed += reliability_fixed(conf.exp().cpu().numpy(), ok)
        raw = logp if logp_raw is None else logp_raw.index_select(0, rows.to(logp_raw.device)).double().to(logp.device)
        raw_conf, raw_pred = raw.max(1)
        self.nll_raw_fixed += int(fixed((-raw.gather(1, y[:, None])).clamp(max=NLL_CAP).cpu().numpy(),
                                         NLL_SCALE).sum())
        self.calibration_raw_fixed += reliability_fixed(raw_conf.exp().cpu().numpy(), (raw_pred == y).cpu().numpy())
        self.scores.append(conf.cpu().numpy())
        self.hits.append(ok.astype(bool))
        self.score_ids.append(np.asarray(ids, dtype=np.int64)[keep])
        for name, table in (("condition", self.conditions), ("country", self.countries), ("source", self.sources)):
            if name in meta:
                g = meta[name][keep]
                np.add.at(table[:, 0], g, 1)
                np.add.at(table[:, 1], g, ok.astype(np.int64))
        if images is not None and len(self.corrupted):  # clean by brightness, beside the corruptions' rows
            self.light_clean += bin_counts(brightness_bins(images[keep]), ok)
        if images is not None:
            self._keep_examples(y_np, pred_np, ids[keep], images[keep], [keys[i] for i in np.flatnonzero(keep)]
                                if keys is not None else None)

    def _keep_examples(self, y: np.ndarray, pred: np.ndarray, ids: np.ndarray, imgs: np.ndarray,
                       keys: list[str] | None) -> None:
        """Keep, per confusion pair, the ids of lowest :func:`_rank`, and per class one correct sample.

        A rank that depends on the id alone makes the choice independent of batching and ranks; a
        scrambled one (not the smallest ids) spreads the examples over the data, where the smallest
        ids of GTSRB would be consecutive frames of a single track.
        """
        for j in np.flatnonzero(y != pred):
            pair, i = (int(y[j]), int(pred[j])), int(ids[j])
            kept = self.examples.setdefault(pair, [])
            if len(kept) < EXAMPLES_PER_CONFUSION or rank_of(i) < rank_of(kept[-1][0]):
                kept.append((i, keys[j] if keys else str(i), imgs[j].copy()))
                kept.sort(key=lambda e: rank_of(e[0]))
                del kept[EXAMPLES_PER_CONFUSION:]
        for j in np.flatnonzero(y == pred):
            c, i = int(y[j]), int(ids[j])
            if c not in self.prototypes or rank_of(i) < rank_of(self.prototypes[c][0]):
                self.prototypes[c] = (i, imgs[j].copy())

    def selective(self) -> dict[str, Any]:
        """:func:`risk_coverage` of everything added, ties in confidence broken by sample id."""
        scores = np.concatenate(self.scores) if self.scores else np.zeros(0)
        hits = np.concatenate(self.hits) if self.hits else np.zeros(0, dtype=bool)
        ids = np.concatenate(self.score_ids) if self.score_ids else np.zeros(0, dtype=np.int64)
        # ranked on the log-probability: exp() rounds many confident rows to exactly 1.0
        return risk_coverage(np.exp(scores), hits, order=np.lexsort((ids, -scores)))

    def add_skips(self, skips: Iterable[tuple[str, str, str]]) -> None:
        for key, reason, detail in skips:
            self.skips[reason] += 1
            if len(self.skip_examples) < SKIP_EXAMPLES * 4:
                self.skip_examples.append((key, reason, detail))

    def reduce(self, device: torch.device) -> None:
        """Sum every rank's tally into every rank's (a no-op in a single process)."""
        if not distributed.is_initialized():
            return
        for name in ("confusion", "calibration_fixed", "calibration_raw_fixed", "conditions", "countries", "sources",
                     "corrupted", "light_clean", "light_corrupted"):
            t = distributed.all_reduce_sum(torch.from_numpy(getattr(self, name).copy()).to(device))
            setattr(self, name, t.cpu().numpy())
        scalars = distributed.all_reduce_sum(torch.tensor([self.top5, self.nll_fixed, self.nll_raw_fixed],
                                                          dtype=torch.int64, device=device)).cpu().tolist()
        self.top5, self.nll_fixed, self.nll_raw_fixed = scalars
        parts = distributed.all_gather_object({"scores": self.scores, "hits": self.hits, "score_ids": self.score_ids,
                                               "skips": self.skips, "skip_examples": self.skip_examples,
                                               "unmapped": self.unmapped, "examples": self.examples,
                                               "prototypes": self.prototypes, "seconds": self.seconds,
                                               "corruption_seconds": self.corruption_seconds})
        self.skips, self.unmapped = Counter(), Counter()
        self.skip_examples, self.examples, self.prototypes = [], {}, {}
        self.scores, self.hits, self.score_ids = [], [], []
        for p in parts:
            self.scores += p["scores"]
            self.hits += p["hits"]
            self.score_ids += p["score_ids"]
            self.skips.update(p["skips"])
            self.unmapped.update(p["unmapped"])
            self.skip_examples += p["skip_examples"]
            for pair, kept in p["examples"].items():
                self.examples[pair] = sorted(self.examples.get(pair, []) + kept,
                                             key=lambda e: rank_of(e[0]))[:EXAMPLES_PER_CONFUSION]
            for c, proto in p["prototypes"].items():
                if c not in self.prototypes or rank_of(proto[0]) < rank_of(self.prototypes[c][0]):
                    self.prototypes[c] = proto
        # the slowest rank decides how long the evaluation took
        self.seconds = max(p["seconds"] for p in parts)
        self.corruption_seconds = max(p["corruption_seconds"] for p in parts)

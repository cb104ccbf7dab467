"""Which region wins each text, with ties said as ties: the one rule for ``falip score``, ``falip serve`` and the demo.

A score table is ``scores (K, T)``: region k against text j, the model's own logits. Region k is *tied best*
for text j when its score is within ``TIE_TOLERANCE`` (relative to the larger of 1 and the best score's
magnitude) of the best score: ``method="none"`` encodes the whole image for every region, so all K tie exactly,
and float noise between execution modes is far below the tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TIE_TOLERANCE = 1e-5

SCORE_NAMES = {
    "softmax": "logit scale · cosine",
    "sigmoid": "logit scale · cosine + logit bias (sigmoid logit)",
}


def score_name(score_kind: str) -> str:
    """What a score of a model with ``score_kind`` (``runtime.score_kind``) is, in words, for tables and JSON."""
    try:
        return SCORE_NAMES[score_kind]
    except KeyError:
        raise ValueError(f"unknown score kind {score_kind!r}; expected one of {sorted(SCORE_NAMES)}") from None


@dataclass(frozen=True)
class Winners:
    """The winner of each of T texts over K regions.

    best: ``(T,)`` the 0-based index of the highest-scoring region (the first of the tied ones).
    tied: ``(T,)`` every region within the tie tolerance of the best, ascending (length 1 = a clear winner).
    """

    best: list[int]
    tied: list[list[int]]

    @property
    def tie(self) -> list[bool]:
        """``(T,)`` True where more than one region is tied best."""
        return [len(t) > 1 for t in self.tied]


def winners(scores: torch.Tensor) -> Winners:
    """The best region per text of ``scores (K, T)`` and the regions tied with it (see the module docstring)."""
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be (K, T) with K ≥ 1 regions, got shape {tuple(scores.shape)}")
    s = scores.detach().double().cpu()
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores contain NaN or infinity; no region can be called best (the model's logits overflowed)")
    top = s.max(dim=0).values  # (T,)
    tol = TIE_TOLERANCE * top.abs().clamp(min=1.0)
    close = s >= (top - tol)  # (K, T)
    tied = [torch.nonzero(close[:, j]).flatten().tolist() for j in range(s.shape[1])]
    return Winners(best=[t[0] for t in tied], tied=tied)


def score_table(scores: torch.Tensor, texts: Sequence[str], score_kind: str) -> dict:
    """The JSON shape shared by ``falip score --json`` and ``POST /api/score`` for ``scores (K, T)``:
    ``scores[k][j]``, ``best[j]`` (region index), ``tie[j]``, ``tied[j]`` (region indices), ``texts``, ``score``
    (what the numbers are). Callers add their own context (model, method, mode, config, regions)."""
    if len(texts) != scores.shape[1]:
        raise ValueError(f"{len(texts)} texts for a score table with {scores.shape[1]} columns")
    won = winners(scores)
    return dict(
        texts=list(texts),
        scores=scores.tolist(),
        best=won.best,
        tie=won.tie,
        tied=won.tied,
        score=dict(kind=score_kind, name=score_name(score_kind)),
    )

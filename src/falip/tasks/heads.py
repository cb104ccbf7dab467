"""``falip heads`` as a run: which attention heads respond to a visual prompt, over a region data set.

:func:`falip.heads.head_response` measures each region's per-head change (its records go to the run's
predictions file, so an interrupted run resumes); :class:`falip.tasks.run.Run` gives the run its
fingerprint, recorder, lost-inputs rule and results JSON (``heads.json``, with the response matrix, its
ranking and the heatmap ``heads.png`` beside it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from ..bias import FovealConfig
from ..digests import describe_inputs, file_stamp
from ..heads import STATISTICS, head_response, rank_heads
from ..methods import parse_method
from ..results import RunRecorder, writing
from ..viz import draw_head_heatmap
from .run import Run, Summary, digest, fingerprint, skip_reasons, weights_files


def describe(model, prompt: str, statistic: str, config: Optional[FovealConfig] = None) -> dict:
    """Everything that determines a heads run's answers, JSON-able: the model, its preprocessing, the
    prompt (method), the statistic and, for a foveal prompt, the bias (``falip``)."""
    method = parse_method(prompt)
    return dict(
        task="heads",
        models=[{k: v for k, v in model.info().items() if k != "device"}],
        preprocess=model.preprocess,
        method=method.name,
        statistic=statistic,
        falip=(config or model.config).to_dict() if method.foveal else None,
    )


def _stamps(samples: Sequence) -> str:
    """One digest of the stamps of every image and mask file the samples read: a file replaced or rewritten
    under the same name changes it, and a resume is refused (heads records carry no per-record stamp)."""
    paths = sorted({str(p) for s in samples for p in (s.image, getattr(s, "mask", None)) if p is not None})
    return digest([(p, file_stamp(p)) for p in paths])


def evaluate(
    model,
    samples: Sequence,
    prompt: str,
    output,
    *,
    statistic: str = "l2",
    config: Optional[FovealConfig] = None,
    run_config: Optional[dict] = None,
    files: Optional[dict] = None,
    image_root=None,
    top: int = 10,
    resume: bool = True,
    progress: bool = True,
    allow_lost_inputs: bool = False,
) -> dict:
    """Head response of ``prompt`` over region ``samples``: ``output/heads.json`` (results), its predictions
    JSONL (each region's Δ, resumed) and ``output/heads.png`` (the heatmap, ``top`` heads outlined).

    ``files``/``image_root``: what the samples were read from (fingerprinted by content / path).
    Returns the results dict (``response`` ``[layers][heads]``, ``std``, ``ranking``, ``metrics.n``)."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    out = Path(output)
    files = {k: v for k, v in (files or {}).items() if v is not None}
    masks = [s.mask for s in samples if getattr(s, "mask", None) is not None]
    run = Run(
        "heads",
        out / "heads.json",
        fingerprint(describe(model, prompt, statistic, config), run_config),
        inputs={**describe_inputs([model], files=files, image_root=image_root), "images": _stamps(samples)},
        reads=[*files.values(), *weights_files([model]), *(s.image for s in samples), *masks],
        resume=resume,
        allow_lost_inputs=allow_lost_inputs,
        progress=progress,
        unit="region",
    )
    result = head_response(model, samples, prompt, statistic, config or model.config, recorder=run.rec, progress=progress)
    heatmap = out / "heads.png"

    def summarize(rec: RunRecorder) -> Summary:
        current = [rec.done[s.id] for s in samples if s.id in rec.done]
        metrics = {"n": result.n, "max_response": float(result.response.max()), "mean_response": float(result.response.mean())}
        fields = dict(
            prompt=result.prompt,
            statistic=statistic,
            model=model.info(),
            shape=["layers", "heads"],
            response=np.round(result.response, 6).tolist(),
            std=np.round(result.std, 6).tolist(),
            ranking=rank_heads(result.response),
            heatmap=heatmap.name,
        )
        return Summary(metrics, order=[s.id for s in samples], items=len(samples), lost=skip_reasons(current), fields=fields)

    results = run.finish(summarize)
    title = f"{result.prompt}: {statistic} change of each head's [CLS] term, n={result.n}"
    with writing(heatmap):
        draw_head_heatmap(result.response, title, top=top).save(heatmap)  # once the run is accepted
    return results

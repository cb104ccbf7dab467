"""The public calls share one argument order: the model (where a function takes it), image(s), regions, texts,
then keywords; nothing that is required has a default."""

from __future__ import annotations

import inspect

import pytest

import falip
from falip import methods
from falip.heads import prompt_response
from falip.tasks.classify import classify
from falip.tasks.rec import ground

ORDER = [
    (falip.FalipModel.score_regions, ["self", "image", "boxes", "texts"]),
    (falip.FalipModel.score_regions_batch, ["self", "images", "boxes_per_image", "texts"]),
    (falip.FalipModel.encode_regions, ["self", "image", "boxes"]),
    (falip.FalipModel.encode_regions_batch, ["self", "images", "boxes_per_image"]),
    (methods.score_with_method, ["model", "image", "boxes", "texts"]),
    (methods.encode_with_method, ["model", "image", "boxes"]),
    (methods.encode_with_method_batch, ["model", "images", "boxes_per_image"]),
    (methods.encode_unleashed, ["model", "image", "boxes"]),
    (prompt_response, ["model", "image", "box"]),
    (ground, ["model", "image", "boxes", "text"]),
    (classify, ["model", "image", "region", "classnames"]),
]


@pytest.mark.parametrize("fn, positional", ORDER, ids=[f.__qualname__ for f, _ in ORDER])
def test_public_calls_take_images_regions_texts_then_keywords(fn, positional):
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    texts = [p for p in params if p.name in ("texts", "text", "classnames")]
    assert all(p.default is p.empty for p in texts), "texts are required"
    keywords = [p for p in params if p.kind is p.KEYWORD_ONLY]
    assert all(p.name not in positional for p in keywords)

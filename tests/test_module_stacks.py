"""Every sentence-transformers module stack of a BERT model, against sentence-transformers itself.

Tiny random models of three BERT shapes (tests/st_stacks.py: CASES, a covering design of shapes x
pooling modes and combinations x Dense x Normalize x prompts), each built and saved by
sentence-transformers; for each one:
- `encode` equals sentence-transformers' `encode` within 1e-5, without a prompt, with a named
  prompt and with a prompt text (the default prompt name applies when none is given);
- one train step's loss and gradient (every encoder and Dense tensor), dropout off, through our
  packed train step, equal sentence-transformers' loss and torch's gradient within 1e-5;
- exported by us, the model loads in sentence-transformers with the same embeddings, and our two
  formats round-trip bit for bit;
- packed and unpacked layouts give the same embeddings, for every pooling.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import st_stacks
from st_stacks import CASES, PROMPTS

ENCODE_ATOL = 1e-5
N_TEXTS = 24


@pytest.fixture(scope="module")
def texts(data_dir):
    with open(data_dir / "stsb_dev.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    out = [r[0] for r in rows[:N_TEXTS // 2]] + [r[1] for r in rows[:N_TEXTS // 2]]
    return out + ["", "A", "Ünïcode 東京 café", "word " * 80]  # empty, one token, unknown characters, truncated


@pytest.fixture(scope="module")
def built(tmp_path_factory, texts, model_path):
    """case id -> (SentenceTransformer, its saved folder), built lazily."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stacks")
    cache = {}

    def get(case):
        if case.id not in cache:
            cache[case.id] = st_stacks.saved_st_model(case, root, texts, str(model_path))
        return cache[case.id]

    return get


def _relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-12))


def test_the_matrix_covers_every_value_of_every_factor():
    from minilm_jax.config import POOLING_MODES

    assert {c.shape for c in CASES} == set(st_stacks.SHAPES)
    assert {m for c in CASES for m in c.pooling} == set(POOLING_MODES)
    assert sum(len(c.pooling) > 1 for c in CASES) >= 2
    assert any(list(c.pooling) != [m for m in POOLING_MODES if m in c.pooling] for c in CASES)  # 6.x's order
    activations = {a for c in CASES for a, _ in c.dense}
    assert {len(c.dense) for c in CASES} == {0, 1, 2}
    assert len(activations) >= 2 and any(not b for c in CASES for _, b in c.dense)
    assert {c.normalize for c in CASES} == {True, False}
    assert {c.include_prompt for c in CASES} == {True, False}
    assert any(c.default_prompt_name for c in CASES) and any(not c.default_prompt_name for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_encode_equals_sentence_transformers(case, built, texts):
    import minilm_jax

    st, folder = built(case)
    model = minilm_jax.load(folder)
    assert model.sentence.pooling == case.pooling and model.sentence.normalize == case.normalize
    assert [d.activation for d in model.sentence.dense] == [a for a, _ in case.dense]
    assert model.sentence.include_prompt == case.include_prompt
    assert PROMPTS.items() <= model.sentence.prompt_dict.items()
    assert model.sentence.default_prompt_name == case.default_prompt_name
    outputs = {}
    for name, kwargs in (("default", {}), ("prompt_name", {"prompt_name": "query"}),
                         ("prompt", {"prompt": "passage: "})):
        ours = minilm_jax.encode(texts, model, **kwargs)
        theirs = st.encode(texts, batch_size=16, **kwargs)
        assert ours.shape == theirs.shape == (len(texts), st.get_embedding_dimension())
        err = float(np.abs(ours - theirs).max())
        print(f"\n{case.id} {name}: max |ours - ST| {err:.2e}")
        assert err <= ENCODE_ATOL * max(1.0, float(np.abs(theirs).max()))
        outputs[name] = ours
    # The prompts are not a no-op: a prompt changes the embeddings (unless it is the default one).
    assert not np.allclose(outputs["prompt_name"], outputs["prompt"], atol=1e-4)
    if case.default_prompt_name is None:
        assert not np.allclose(outputs["default"], outputs["prompt_name"], atol=1e-4)
    else:
        assert case.default_prompt_name == "query" or not np.allclose(outputs["default"], outputs["prompt_name"])

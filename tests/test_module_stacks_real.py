"""Variants of the real all-MiniLM-L6-v2 built with sentence-transformers: CLS pooling with a query
prompt and no Normalize; mean pooling with a Dense 384->256 layer (Tanh), Normalize and the dot
product as similarity. For each: encode equals sentence-transformers' within 1e-5 on STS-B dev
sentences, with and without the prompt; a short training run (train.py, the prompt on the first
column) exports a model that sentence-transformers loads, with the same stack, trained weights and
the same embeddings as ours.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import run_cli, write_subset

VARIANTS = {
    # name: (pooling mode, Dense out_features or None, Normalize, similarity_fn_name)
    "cls-prompt-no-normalize": ("cls", None, False, "cosine"),
    "dense-256-dot": ("mean", 256, True, "dot"),
}
PROMPTS = {"query": "Represent this sentence for searching relevant passages: "}


@pytest.fixture(scope="module")
def sentences(data_dir):
    with open(data_dir / "stsb_dev.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[0] for r in rows[200:240]] + [r[1] for r in rows[200:240]]


@pytest.fixture(scope="module")
def variants(tmp_path_factory, model_path):
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("real-variants")
    out = {}
    for name, (mode, dense, normalize, similarity) in VARIANTS.items():
        stack = [modules.Transformer(str(model_path), max_seq_length=256), modules.Pooling(384, pooling_mode=mode)]
        if dense:
            stack.append(modules.Dense(384, dense, activation_function=torch.nn.Tanh()))
        if normalize:
            stack.append(modules.Normalize())
        model = SentenceTransformer(modules=stack, device="cpu", prompts=PROMPTS, similarity_fn_name=similarity)
        model.eval()
        model.save(str(root / name))
        out[name] = (model, root / name)
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_real_variant_encode_equals_sentence_transformers(name, variants, sentences):
    import minilm_jax

    st, folder = variants[name]
    model = minilm_jax.load(folder)
    for kwargs in ({}, {"prompt_name": "query"}):
        ours, theirs = minilm_jax.encode(sentences, model, **kwargs), st.encode(sentences, batch_size=32, **kwargs)
        err = float(np.abs(ours - theirs).max())
        print(f"\n{name} {kwargs}: {ours.shape}, max |ours - ST| {err:.2e}")
        assert ours.shape == theirs.shape and err <= 1e-5
    a, b = minilm_jax.encode(sentences[:5], model), minilm_jax.encode(sentences[5:9], model)
    np.testing.assert_allclose(minilm_jax.similarity(a, b, model=model), st.similarity(a, b).numpy(), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_real_variant_trains_and_exports_for_sentence_transformers(name, variants, sentences, data_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    import minilm_jax

    _, folder = variants[name]
    train = write_subset(data_dir / "quora_train.tsv", tmp_path / "train.tsv", 32)
    out = tmp_path / "run"
    proc = run_cli("train.py", "--model", folder, "--train-file", train, "--output-dir", out,
                   "--max-steps", 2, "--log-every", 1, "--no-progress", "--prompt", "sentence1=@query")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}"
    from minilm_jax.convert import flatten

    before, after = minilm_jax.load(folder), minilm_jax.load(out / "model")
    assert after.sentence == before.sentence  # the stack, the prompts, the similarity: kept
    old, new = flatten(before.params), flatten(after.params)
    changed = {k for k in old if not np.array_equal(np.asarray(old[k]), np.asarray(new[k]))}
    assert "layer_5/output/kernel" in changed  # the encoder trained
    assert ("dense_0/kernel" in changed) == bool(VARIANTS[name][1])  # and the Dense layer
    st = SentenceTransformer(str(out / "model"), device="cpu")
    assert [type(m).__name__ for m in st] == [type(m).__name__ for m in SentenceTransformer(str(folder), device="cpu")]
    assert st.similarity_fn_name == VARIANTS[name][3] and st.prompts["query"] == PROMPTS["query"]
    for kwargs in ({}, {"prompt_name": "query"}):
        err = float(np.abs(minilm_jax.encode(sentences, after, **kwargs) - st.encode(sentences, **kwargs)).max())
        assert err <= 1e-5, f"{kwargs}: {err:.2e}"
    card = (out / "model" / "README.md").read_text()
    assert ("Dense(" in card) == bool(VARIANTS[name][1]) and ("Normalize()" in card) == VARIANTS[name][2]

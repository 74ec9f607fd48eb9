"""Parity with sentence-transformers on the real weights: same token ids, same embeddings (<= 1e-5).

The sentences are real ones, drawn deterministically from ../shared/data (STS-B and Quora, both
columns), plus edge cases: a text over 256 tokens, non-ASCII scripts, emoji, empty and
whitespace-only strings, and very long words.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import read_pairs_tsv, st_features

N_PER_FILE = {"stsb_dev.tsv": 150, "stsb_train.tsv": 150, "quora_train.tsv": 150, "quora_dev.tsv": 100}
EMBED_TOL = 1e-5

EDGE_CASES = [
    "",
    "   \t ",
    " ",
    "\n",
    "Café crème brûlée à la française, naïve coöperation, déjà vu.",
    "Ça va? Über straße — Ærøskøbing; señor; façade",
    "e\u0301 versus \u00e9 (combining accent against precomposed)",
    "東京は日本の首都です。",
    "我爱自然语言处理，这是一个测试句子。",
    "한국어 문장도 토큰화됩니다",
    "مرحبا بالعالم، هذه جملة عربية للاختبار",
    "Привет, мир! Ελληνικά γράμματα. עברית",
    "I love pizza 🍕🍕 and tacos 🌮 😀👍🏽",
    "👨‍👩‍👧‍👦❤️🔥",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "zero\u200bwidth and non\u00a0breaking spaces",
    "line one\nline two\r\nline three\ttabbed",
    "[CLS] [SEP] [MASK] [PAD] [UNK] inside a sentence",
    "a" * 500,
    "Supercalifragilisticexpialidocious" * 12,
    "pneumonoultramicroscopicsilicovolcanoconiosis is a long word",
    "x",
    "?!?!...,,,;;;:::",
    "1234567890 3.14159 1e-10 $100 50% #hashtag @mention http://example.com/a?b=c",
]


def _real_sentences(data_dir) -> list[str]:
    sentences = []
    for name, n in N_PER_FILE.items():
        rows = read_pairs_tsv(data_dir / name)
        for a, b, _ in random.Random(f"parity-{name}").sample(rows, n):
            sentences += [a, b]
    return list(dict.fromkeys(sentences))  # de-duplicated, order kept


@pytest.fixture(scope="module")
def long_text(data_dir, st_model) -> str:
    """Real sentences joined until the text is well over 256 tokens (about 400)."""
    rows = read_pairs_tsv(data_dir / "stsb_train.tsv")
    text = ""
    for a, _, _ in rows:
        text = f"{text} {a}".strip()
        if len(st_model.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"]) > 400:
            return text
    raise AssertionError("stsb_train.tsv is too short to build a 400-token text")


@pytest.fixture(scope="module")
def sentences(data_dir, long_text) -> list[str]:
    real = _real_sentences(data_dir)
    assert len(real) >= 1000, len(real)
    return real + EDGE_CASES + [long_text, long_text + " and a tail that is cut off"]


@pytest.fixture(scope="module")
def st_embeddings(st_model, sentences) -> np.ndarray:
    return st_model.encode(sentences, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)


@pytest.fixture(scope="module")
def jax_embeddings(jax_model, sentences) -> np.ndarray:
    import minilm_jax

    return minilm_jax.encode(sentences, jax_model, batch_size=64)


def test_sentences_cover_both_datasets_and_lengths(sentences, jax_model):
    lengths = [len(t) for t in jax_model.tokenizer.token_ids(sentences)]
    assert len(sentences) >= 1000 + len(EDGE_CASES)
    assert max(lengths) == 256
    assert sum(n > 64 for n in lengths) >= 3, "want a few sentences beyond the short buckets"
    assert min(lengths) == 2  # "" -> [CLS] [SEP]


def test_token_ids_match_sentence_transformers(sentences, jax_model, st_reference_tokens):
    ours = [t.tolist() for t in jax_model.tokenizer.token_ids(sentences)]
    theirs = st_reference_tokens(sentences)
    mismatches = [(i, sentences[i][:60], a[:20], b[:20]) for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not mismatches, f"{len(mismatches)} token-id mismatches, first ones: {mismatches[:5]}"


def test_long_text_truncated_at_256_not_128(long_text, jax_model, st_reference_tokens, model_path):
    import tokenizers

    ids = jax_model.tokenizer.token_ids([long_text])[0].tolist()
    assert len(ids) == 256
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP] survive truncation
    assert ids == st_reference_tokens([long_text])[0]
    # The trap this guards against: the checkpoint's tokenizer.json truncates at 128 by itself.
    raw = tokenizers.Tokenizer.from_file(f"{model_path}/tokenizer.json")
    assert len(raw.encode(long_text).ids) == 128
    assert ids[:127] == raw.encode(long_text).ids[:127]


@pytest.mark.parametrize("text", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_edge_case_token_ids(text, jax_model, st_reference_tokens):
    assert jax_model.tokenizer.token_ids([text])[0].tolist() == st_reference_tokens([text])[0]


def test_embeddings_match_sentence_transformers(sentences, st_embeddings, jax_embeddings):
    assert jax_embeddings.dtype == np.float32
    assert jax_embeddings.shape == st_embeddings.shape == (len(sentences), 384)
    assert np.isfinite(jax_embeddings).all()
    diff = np.abs(jax_embeddings - st_embeddings).max(axis=1)
    worst = int(np.argmax(diff))
    assert diff.max() <= EMBED_TOL, f"max |diff| {diff.max():.3g} at sentence {worst}: {sentences[worst][:80]!r}"
    np.testing.assert_allclose(np.linalg.norm(jax_embeddings, axis=1), 1.0, atol=1e-5)


def test_edge_case_embeddings_match(sentences, st_embeddings, jax_embeddings):
    # Covered by the test above; kept separate so a failure names the edge case.
    start = len(sentences) - len(EDGE_CASES) - 2
    for i, text in enumerate(EDGE_CASES + ["<long text>", "<long text + tail>"]):
        diff = np.abs(jax_embeddings[start + i] - st_embeddings[start + i]).max()
        assert diff <= EMBED_TOL, f"{text[:40]!r}: max |diff| {diff:.3g}"


def test_truncation_makes_tail_irrelevant(sentences, jax_embeddings):
    # Both long texts share their first 256 tokens, so their embeddings are the same.
    np.testing.assert_array_equal(jax_embeddings[-1], jax_embeddings[-2])


def test_order_and_batch_size_do_not_change_embeddings(sentences, jax_model, jax_embeddings):
    import minilm_jax

    # Every 9th sentence, reversed: each lands in a batch with different companions and padding.
    picked = list(range(0, len(sentences), 9))[::-1]
    again = minilm_jax.encode([sentences[i] for i in picked], jax_model, batch_size=64)
    np.testing.assert_allclose(again, jax_embeddings[picked], rtol=0, atol=1e-6)


def test_device_calls_of_any_size_give_the_same_embeddings(sentences, jax_model, jax_embeddings, monkeypatch):
    """On CPU encode cuts batches into device calls of at most 32 sentences; GPUs and TPUs take
    batch_size as given. Both ways (and calls of 5) give the same embeddings."""
    import importlib

    import minilm_jax

    encode_module = importlib.import_module("minilm_jax.encode")
    picked = list(range(0, len(sentences), 5))
    for cap in (5, 10**6):
        monkeypatch.setattr(encode_module, "_CPU_ROWS_PER_CALL", cap)
        again = minilm_jax.encode([sentences[i] for i in picked], jax_model, batch_size=128)
        np.testing.assert_allclose(again, jax_embeddings[picked], rtol=0, atol=1e-6, err_msg=f"calls of {cap}")


def test_single_string_gives_vector(jax_model, st_model):
    import minilm_jax

    text = "A man is playing a guitar."
    emb = minilm_jax.encode(text, jax_model)
    assert emb.shape == (384,) and emb.dtype == np.float32
    ref = st_model.encode(text, normalize_embeddings=True, convert_to_numpy=True)
    assert ref.shape == (384,)
    assert np.abs(emb - ref).max() <= EMBED_TOL


def test_empty_list_gives_empty_matrix(jax_model):
    import minilm_jax

    emb = minilm_jax.encode([], jax_model)
    assert emb.shape == (0, 384) and emb.dtype == np.float32


def test_similarity_matches_sentence_transformers(st_model, st_embeddings, jax_embeddings):
    import minilm_jax

    ours = minilm_jax.similarity(jax_embeddings[:50], jax_embeddings[50:90])
    theirs = st_model.similarity(st_embeddings[:50], st_embeddings[50:90]).numpy()
    assert ours.shape == (50, 40)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def variant_folder(tmp_path_factory, model_path):
    """The real model with other sentence-transformers settings: max_seq_length 128, do_lower_case true,
    and a cased tokenizer (so do_lower_case changes the tokens). Weights are a symlink."""
    import json
    import os
    import shutil
    from pathlib import Path

    src, dst = Path(model_path), tmp_path_factory.mktemp("variant") / "model"
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name == "model.safetensors":
            os.symlink(entry, dst / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, dst / entry.name)
        else:
            shutil.copy(entry, dst / entry.name)
    tokenizer = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    assert tokenizer["normalizer"]["lowercase"] is True
    tokenizer["normalizer"]["lowercase"] = False
    (dst / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    tokenizer_config = json.loads((dst / "tokenizer_config.json").read_text())
    tokenizer_config["do_lower_case"] = False
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (dst / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": True}))
    return str(dst)


def test_other_sentence_settings_match_sentence_transformers(variant_folder, long_text, sentences):
    """max_seq_length and do_lower_case are read from the folder and applied as sentence-transformers does."""
    from sentence_transformers import SentenceTransformer

    import minilm_jax

    st = SentenceTransformer(variant_folder, device="cpu")
    assert st.max_seq_length == 128
    model = minilm_jax.load(variant_folder)
    texts = ["Hello WORLD, This Is Mixed Case.", "ÀÉÎ Ünïcödé İstanbul", "[MASK] and [CLS] Inside", long_text,
             *sentences[:40]]
    ours = [t.tolist() for t in model.tokenizer.token_ids(texts)]
    batch = st_features(st, texts)
    theirs = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    for text, a, b in zip(texts, ours, theirs):
        assert a == b, f"{text[:40]!r}: {a[:12]} != {b[:12]}"
    assert len(ours[3]) == 128
    assert 100 not in ours[0], "mixed case became [UNK]: do_lower_case was not applied"
    diff = np.abs(minilm_jax.encode(texts, model) - st.encode(texts, convert_to_numpy=True)).max()
    assert diff <= EMBED_TOL


@pytest.mark.parametrize("dim", [128, 64])
def test_truncate_dim_matches_sentence_transformers(st_model, jax_model, sentences, dim):
    """encode(truncate_dim=k) (a model trained with MatryoshkaLoss) keeps the first k values of the
    normalised embedding, as sentence-transformers' truncate_dim; similarity renormalises."""
    import minilm_jax

    texts = sentences[:64]
    ours = minilm_jax.encode(texts, jax_model, truncate_dim=dim)
    theirs = st_model.encode(texts, truncate_dim=dim, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (64, dim)
    assert np.abs(ours - theirs).max() <= EMBED_TOL
    np.testing.assert_allclose(minilm_jax.similarity(ours, ours), st_model.similarity(theirs, theirs).numpy(),
                               atol=1e-5)
    with pytest.raises(minilm_jax.UserError, match="truncate_dim"):
        minilm_jax.encode(texts[:2], jax_model, truncate_dim=385)

"""Corpus scale: embed_corpus.py's shards (precisions, resume after kill -9, several devices and processes,
errors) and search on the devices against sentence-transformers (util.semantic_search,
paraphrase_mining_embeddings, quantize_embeddings, semantic_search_faiss's rescoring)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, assert_user_error, cpu_devices_env, run_cli
from test_distributed import free_port
from tiny_model import write_tiny_model

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")


def _questions(data_dir: Path, n: int, start: int = 0) -> list[str]:
    """n distinct Quora dev questions (sentence1), in file order."""
    seen = {}
    with open(data_dir / "quora_dev.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            seen.setdefault(line.split("\t")[0], None)
            if len(seen) == start + n:
                break
    return list(seen)[start:]


@pytest.fixture(scope="module")
def real(jax_model, data_dir):
    """Real embeddings: 600 corpus questions, 40 other questions as queries."""
    import minilm_jax

    texts = _questions(data_dir, 640)
    emb = minilm_jax.encode(texts, jax_model)
    return {"texts": texts, "corpus": emb[:600], "queries": emb[600:]}


def _st_ids_scores(hits):
    return (np.array([[h["corpus_id"] for h in row] for row in hits]),
            np.array([[h["score"] for h in row] for row in hits]))


# ----------------------------------------------------------------------------- quantization

def test_every_precision_equals_quantize_embeddings(real):
    from sentence_transformers.util.quantization import _dequantize_embeddings, quantize_embeddings

    from minilm_jax.quantize import dequantize, quantize, ranges_of

    emb, calibration = real["corpus"], real["corpus"][:200]
    ranges = ranges_of(calibration)
    for precision in PRECISIONS:
        ours = quantize(emb, precision, ranges)
        theirs = emb.astype(np.float16) if precision == "float16" else quantize_embeddings(
            emb, precision, calibration_embeddings=calibration)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, precision
        assert ours.tobytes() == theirs.tobytes(), precision
    for precision in ("int8", "uint8"):  # ranges from the embeddings themselves, as quantize_embeddings' default
        assert quantize(emb, precision, ranges_of(emb)).tobytes() == quantize_embeddings(emb, precision).tobytes()
        stored = quantize(emb, precision, ranges)
        assert np.array_equal(dequantize(stored, precision, 384, ranges),
                              _dequantize_embeddings(stored.astype(int), precision, ranges))


# ----------------------------------------------------------------------------- search

@pytest.mark.parametrize("fn", ["cosine", "dot"])
def test_semantic_search_matches_util(real, fn):
    import torch
    from sentence_transformers import util

    import minilm_jax

    q, c = real["queries"], real["corpus"] * (1.0 if fn == "cosine" else np.linspace(0.5, 2, 600)[:, None])
    c = c.astype(np.float32)
    ours = minilm_jax.semantic_search(q, c, top_k=10, score_function=fn, corpus_chunk_size=128, query_chunk_size=16)
    theirs = util.semantic_search(torch.from_numpy(q), torch.from_numpy(c), top_k=10, corpus_chunk_size=128,
                                  score_function=util.cos_sim if fn == "cosine" else util.dot_score)
    (oi, os_), (ti, ts) = _st_ids_scores(ours), _st_ids_scores(theirs)
    assert np.array_equal(oi, ti)
    np.testing.assert_allclose(os_, ts, rtol=0, atol=1e-6 * (1 if fn == "cosine" else 4))


def test_semantic_search_ties_and_bad_queries(real):
    import torch
    from sentence_transformers import util

    import minilm_jax

    c = real["corpus"].copy()
    c[[50, 300, 599]] = c[7]  # exact ties, in two corpus chunks
    q = np.stack([c[7], real["queries"][0]])
    ours = minilm_jax.semantic_search(q, c, top_k=3, corpus_chunk_size=256)
    theirs = util.semantic_search(torch.from_numpy(q), torch.from_numpy(c), top_k=3, corpus_chunk_size=256)
    # Equal rows: ours score them equally and rank them by the lower id. torch's matmul rounds equal rows at
    # other positions differently (1.0 or 1.0000002), so ST picks among them by that rounding: any 3 of the 4.
    assert [h["corpus_id"] for h in ours[0]] == [7, 50, 300]
    assert {h["corpus_id"] for h in theirs[0]} <= {7, 50, 300, 599}
    np.testing.assert_allclose([h["score"] for h in ours[0]], [h["score"] for h in theirs[0]], rtol=0, atol=1e-6)
    assert [h["corpus_id"] for h in ours[1]] == [h["corpus_id"] for h in theirs[1]]
    with pytest.raises(minilm_jax.UserError, match="dimension 100, the corpus 384"):
        minilm_jax.semantic_search(np.ones((2, 100), np.float32), c)
    assert len(minilm_jax.semantic_search(c[:1], c[:5], top_k=10)[0]) == 5  # k capped at the corpus, as ST


@pytest.mark.parametrize("precision", ["uint8", "ubinary", "binary"])
def test_quantized_search_rescores_as_faiss(real, precision):
    """semantic_search_faiss (exact; uint8, ubinary) gives the same hits and scores, rescored and not; binary is
    ubinary's search on bytes shifted by 128."""
    from sentence_transformers.util.quantization import semantic_search_faiss

    from minilm_jax.quantize import quantize, ranges_of
    from minilm_jax.search import place_corpus, search

    q, c = real["queries"], real["corpus"]
    ranges = ranges_of(c)
    placed = place_corpus(quantize(c, precision, ranges), precision, chunk_rows=256, ranges=ranges)
    faiss_precision = {"binary": "ubinary"}.get(precision, precision)
    for rescore in (True, False):
        scores, ids = search(q, placed, 10, rescore=rescore)
        hits, _ = semantic_search_faiss(q, corpus_embeddings=quantize(c, faiss_precision, ranges),
                                        corpus_precision=faiss_precision, top_k=10, ranges=ranges, rescore=rescore)
        theirs_ids, theirs_scores = _st_ids_scores(hits)
        assert np.array_equal(ids, theirs_ids), (precision, rescore)
        if not rescore and faiss_precision == "ubinary":  # faiss reports the Hamming distance, we minus it
            theirs_scores = -theirs_scores
        np.testing.assert_allclose(scores, theirs_scores, rtol=0, atol=1e-9 if rescore else 0)


def test_int8_search_rescores_its_candidates(real):
    """int8 (usearch's precision; not installed here): the top 2k candidates by the inner product of the int8
    values, rescored with sentence-transformers' own dequantisation, einsum and argsort."""
    from sentence_transformers.util.quantization import _dequantize_embeddings

    from minilm_jax.quantize import quantize, ranges_of
    from minilm_jax.search import place_corpus, search

    q, c = real["queries"], real["corpus"]
    ranges = ranges_of(c)
    stored = quantize(c, "int8", ranges)
    scores, ids = search(q, place_corpus(stored, "int8", chunk_rows=256, ranges=ranges), 10)
    ip = quantize(q, "int8", ranges).astype(np.int64) @ stored.astype(np.int64).T
    candidates = np.argsort(-ip, axis=1, kind="stable")[:, :20]
    rescored = np.einsum("ij,ikj->ik", q, _dequantize_embeddings(stored[candidates].astype(int), "int8", ranges))
    order = np.argsort(-rescored)[:, :10]
    rows = np.arange(len(q))[:, None]
    assert np.array_equal(ids, candidates[rows, order])
    np.testing.assert_array_equal(scores, rescored[rows, order])


def test_paraphrase_mining_matches_util(real):
    import torch
    from sentence_transformers import util

    import minilm_jax

    emb = real["corpus"][:300]
    ours = minilm_jax.paraphrase_mining_embeddings(emb, top_k=5, max_pairs=200, query_chunk_size=128)
    theirs = util.paraphrase_mining_embeddings(torch.from_numpy(emb), top_k=5, max_pairs=200, query_chunk_size=128)
    assert [p[1:] for p in ours] == [p[1:] for p in theirs]
    np.testing.assert_allclose([p[0] for p in ours], [p[0] for p in theirs], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- embedding to disk

def _load(folder) -> np.ndarray:
    """A corpus folder read with numpy alone, as the layout documents."""
    m = json.loads((Path(folder) / "corpus.json").read_text())
    assert m["complete"] and [s["start"] for s in m["shards"]] == list(range(0, m["rows"], m["shard_rows"]))
    return np.concatenate([np.load(Path(folder) / s["file"]) for s in m["shards"]])


def test_embed_corpus_every_precision_and_search(real, jax_model, tmp_path):
    """float32 shards equal encode (1e-6); int8/uint8 from calibration rows equal quantize_embeddings with
    those rows' embeddings, bit for bit; the others equal it too; a finished corpus is not redone."""
    from sentence_transformers.util.quantization import quantize_embeddings

    import minilm_jax
    from minilm_jax.corpus import Corpus, TextSource
    from minilm_jax.corpus_run import embed_corpus
    from minilm_jax.search import place_corpus, search

    texts = real["texts"][:160]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    source = TextSource.of([str(tmp_path / "in.txt")])
    kw = dict(shard_rows=64, block_rows=32, calibration_rows=50)
    f32 = embed_corpus(source, str(tmp_path / "float32"), jax_model, "float32", **kw)
    assert (f32.rows, f32.shards, f32.written_rows, f32.complete) == (160, 3, 160, True)
    base = _load(tmp_path / "float32")
    np.testing.assert_allclose(base, minilm_jax.encode(texts, jax_model), rtol=0, atol=1e-6)
    for precision in PRECISIONS[1:]:
        embed_corpus(source, str(tmp_path / precision), jax_model, precision, **kw)
        theirs = base.astype(np.float16) if precision == "float16" else quantize_embeddings(
            base, precision, calibration_embeddings=base[:50])
        assert _load(tmp_path / precision).tobytes() == theirs.tobytes(), precision
    again = embed_corpus(source, str(tmp_path / "int8"), jax_model, "int8", **kw)
    assert again.written_rows == 0 and again.complete
    corpus = Corpus.open(str(tmp_path / "int8"))
    scores, ids = search(real["queries"], place_corpus(corpus, chunk_rows=100), 5)
    assert ids.shape == (40, 5) and ids.max() < 160


def _embed_cmd(inputs, out, *extra) -> list[str]:
    return [str(REPO_ROOT / "embed_corpus.py"), *map(str, inputs), "--output-dir", str(out), "--no-progress", *map(str, extra)]


def test_kill_9_then_resume_equals_an_uninterrupted_run(data_dir, model_path, jax_model, tmp_path):
    from minilm_jax.corpus import TextSource
    from minilm_jax.corpus_run import embed_corpus

    texts = _questions(data_dir, 384)
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    args = _embed_cmd([inp], out, "--shard-rows", 32, "--block-rows", 32, "--model", model_path)
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(list(out.glob("shard-*.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("shard-*.json"))
    assert 3 <= len(done) < 12, done
    before = {p: (out / p).read_bytes() for p in done}
    (out / ".shard-00011.npy.k1lled_x.tmp").write_bytes(b"half")  # as a kill in the middle of a write leaves
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.splitlines()[-1])
    assert summary["written_rows"] == 384 - 32 * len(done)  # no finished shard redone
    assert all((out / p).read_bytes() == before[p] for p in done)
    assert not list(out.glob(".*.tmp"))
    embed_corpus(TextSource.of([str(inp)]), str(tmp_path / "whole"), jax_model, shard_rows=32, block_rows=32)
    killed, whole = _load(out), _load(tmp_path / "whole")
    assert killed.shape == (384, 384) and killed.tobytes() == whole.tobytes()


@pytest.mark.slow
def test_8_devices_and_2_processes_write_the_files_of_one_device(data_dir, model_path, tmp_path):
    """Every local device (8 forced CPU devices) and 2 processes (1 device each, one shared folder): the same
    shards as one device, to 1e-6; the manifests are the same but for nothing."""
    tiny = write_tiny_model(model_path, str(tmp_path / "tiny"))
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(_questions(data_dir, 200)) + "\n", encoding="utf-8")
    common = ["--model", tiny, "--shard-rows", 64, "--block-rows", 32]

    def start(out, devices, *extra):
        env = cpu_devices_env(devices, collective_timeouts=True)
        env["MINILM_JAX_CACHE_DIR"] = str(tmp_path / "xla")
        return subprocess.Popen([sys.executable, *_embed_cmd([inp], out, *common, *extra)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    port = free_port()
    procs = {"one": start(tmp_path / "one", 1), "eight": start(tmp_path / "eight", 8)}
    procs.update({f"p{i}": start(tmp_path / "two", 1, "--coordinator-address", f"127.0.0.1:{port}",
                                 "--num-processes", 2, "--process-id", i, "--init-timeout", 60) for i in (0, 1)})
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (name, err[-3000:])
    one = _load(tmp_path / "one")
    assert one.shape == (200, 64)
    for other in ("eight", "two"):
        np.testing.assert_allclose(_load(tmp_path / other), one, rtol=0, atol=1e-6)
        a, b = (json.loads((tmp_path / d / "corpus.json").read_text()) for d in ("one", other))
        assert {k: v for k, v in a.items() if k != "shards"} == {k: v for k, v in b.items() if k != "shards"}


# ----------------------------------------------------------------------------- errors

def test_errors_are_clear_and_lose_no_shard(real, jax_model, tmp_path):
    import minilm_jax
    from minilm_jax.corpus import Corpus, TextSource
    from minilm_jax.corpus_run import embed_corpus

    texts = real["texts"][:100]
    good = tmp_path / "in.txt"
    good.write_text("\n".join(texts) + "\n", encoding="utf-8")
    blank = tmp_path / "blank.txt"
    blank.write_text("one\n\nthree\n", encoding="utf-8")
    with pytest.raises(minilm_jax.UserError, match=r"blank.txt line 2: the text is empty"):
        TextSource.of([str(blank)]).scan()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(minilm_jax.UserError, match=r"rows.jsonl line 2 has no column 'text' \(found 'body'\)"):
        TextSource.of([str(rows)]).scan()
    table = tmp_path / "t.tsv"
    table.write_text("id\tbody\n1\tx\n", encoding="utf-8")
    with pytest.raises(minilm_jax.UserError, match=r"t.tsv has no column 'text'"):
        TextSource.of([str(table)]).scan()

    out = tmp_path / "c"
    embed_corpus(TextSource.of([str(good)]), str(out), jax_model, "float32", shard_rows=40, block_rows=40)
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(minilm_jax.UserError, match="embedded at precision float32, not int8"):
        embed_corpus(TextSource.of([str(good)]), str(out), jax_model, "int8", shard_rows=40, block_rows=40)
    other_model = jax_model.replace(path="elsewhere")  # the same weights from another folder: accepted ...
    embed_corpus(TextSource.of([str(good)]), str(out), other_model, "float32", shard_rows=40, block_rows=40)
    manifest = json.loads((out / "corpus.json").read_text())
    manifest["model"]["fingerprint"] = "0" * 64  # ... a corpus of another model is refused
    (out / "corpus.json").write_text(json.dumps(manifest))
    with pytest.raises(minilm_jax.UserError, match="embedded by another model"):
        embed_corpus(TextSource.of([str(good)]), str(out), jax_model, "float32", shard_rows=40, block_rows=40)
    (out / "corpus.json").write_bytes(kept["corpus.json"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept  # nothing lost or rewritten

    # A corrupt shard: search refuses it; a foreign shard record: resuming refuses it.
    shard = out / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(minilm_jax.UserError, match="shard-00001.npy is corrupt"):
        Corpus.open(str(out))
    shard.write_bytes(kept["shard-00001.npy"])
    (out / "corpus.json").unlink()
    record = json.loads(kept["shard-00002.json"])
    (out / "shard-00002.json").write_text(json.dumps({**record, "precision": "int8"}))
    with pytest.raises(minilm_jax.UserError, match="shard-00002.json is a foreign shard"):
        embed_corpus(TextSource.of([str(good)]), str(out), jax_model, "float32", shard_rows=40, block_rows=40)
    assert (out / "shard-00000.npy").read_bytes() == kept["shard-00000.npy"]


def test_search_command(real, jax_model, tmp_path):
    """search.py: texts embedded with the corpus's model, hits as JSON lines; a wrong query dimension and an
    incomplete corpus are one error line each."""
    from minilm_jax.corpus import TextSource
    from minilm_jax.corpus_run import embed_corpus

    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(real["texts"][:200]) + "\n", encoding="utf-8")
    out = tmp_path / "c"
    embed_corpus(TextSource.of([str(inp)]), str(out), jax_model, "ubinary", shard_rows=64, block_rows=64)
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"text": t}) + "\n" for t in real["texts"][:3]), encoding="utf-8")
    np.save(tmp_path / "bad.npy", np.ones((2, 100), np.float32))
    (tmp_path / "half").mkdir()
    shutil.copy(out / "corpus.json", tmp_path / "half" / "corpus.json")
    m = json.loads((out / "corpus.json").read_text())
    (tmp_path / "half" / "corpus.json").write_text(json.dumps({**m, "complete": False}))
    from conftest import run_cli_many

    runs = run_cli_many({
        "ok": ["search.py", "--corpus", out, "--queries", queries, "--top-k", 3, "--output", tmp_path / "hits.jsonl"],
        "dim": ["search.py", "--corpus", out, "--queries", tmp_path / "bad.npy"],
        "half": ["search.py", "--corpus", tmp_path / "half", "--queries", tmp_path / "bad.npy"]}, workers=3)
    assert runs["ok"].returncode == 0, runs["ok"].stderr
    hits = [json.loads(line) for line in (tmp_path / "hits.jsonl").read_text().splitlines()]
    assert [h["query"] for h in hits] == [0, 1, 2]
    assert [h["hits"][0]["corpus_id"] for h in hits] == [0, 1, 2]  # each query finds itself, rescored
    assert_user_error(runs["dim"], 1, "dimension 100, the corpus 384")
    assert_user_error(runs["half"], 1, "is not complete yet")


def test_id_column_keeps_each_rows_id_and_search_gives_it(real, jax_model, tmp_path):
    """--id-column: ids (integers from .jsonl, strings from .tsv) stored per shard beside embeddings equal to an
    embedding without ids; search.py gives each hit's id and each query's query_id; bad ids are clear errors."""
    import minilm_jax
    from minilm_jax.corpus import Corpus, TextSource
    from minilm_jax.corpus_run import embed_corpus

    texts = real["texts"][:90]
    ints = [1000 + 7 * i for i in range(90)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"qid": q, "text": t}) + "\n" for q, t in zip(ints, texts)))
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (tmp_path / "b.tsv").write_text("key\ttext\n" + "".join(f"doc-{i}\t{t}\n" for i, t in enumerate(texts)))
    kw = dict(shard_rows=32, block_rows=16)
    embed_corpus(TextSource.of([str(tmp_path / "a.jsonl")], id_column="qid"), str(tmp_path / "ints"), jax_model, **kw)
    embed_corpus(TextSource.of([str(tmp_path / "b.tsv")], id_column="key"), str(tmp_path / "strs"), jax_model,
                 "ubinary", **kw)
    embed_corpus(TextSource.of([str(tmp_path / "a.txt")]), str(tmp_path / "plain"), jax_model, **kw)
    assert _load(tmp_path / "ints").tobytes() == _load(tmp_path / "plain").tobytes()
    for folder, expected, kind in (("ints", ints, "i"), ("strs", [f"doc-{i}" for i in range(90)], "U")):
        m = json.loads((tmp_path / folder / "corpus.json").read_text())
        stored = np.concatenate([np.load(tmp_path / folder / s["ids_file"]) for s in m["shards"]])  # numpy alone
        assert stored.dtype.kind == kind and stored.tolist() == expected
        assert Corpus.open(str(tmp_path / folder)).ids_of(np.array([[89, 0], [33, 32]])).tolist() == [
            [expected[89], expected[0]], [expected[33], expected[32]]]

    queries = tmp_path / "q.tsv"
    queries.write_text("name\ttext\n" + "".join(f"q{i}\t{t}\n" for i, t in zip((5, 40, 77), (texts[5], texts[40], texts[77]))))
    run = run_cli("search.py", "--corpus", tmp_path / "strs", "--queries", queries, "--id-column", "name", "--top-k", 2)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(h["query_id"], h["hits"][0]["corpus_id"], h["hits"][0]["id"]) for h in lines] == [
        ("q5", 5, "doc-5"), ("q40", 40, "doc-40"), ("q77", 77, "doc-77")]

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"qid": 1, "text": "a"}\n{"qid": "2", "text": "b"}\n')
    with pytest.raises(minilm_jax.UserError, match=r"row 2 of .*mixed.jsonl: the id '2' is a string, the ids before it integers"):
        TextSource.of([str(mixed)], id_column="qid").scan()
    flag = tmp_path / "flag.jsonl"
    flag.write_text('{"qid": true, "text": "a"}\n')
    with pytest.raises(minilm_jax.UserError, match=r"flag.jsonl line 1: the id in column 'qid' is bool"):
        TextSource.of([str(flag)], id_column="qid").scan()
    with pytest.raises(minilm_jax.UserError, match=r"b.tsv has no column 'qid' \(found 'key', 'text'\); name the column with --id-column"):
        TextSource.of([str(tmp_path / "b.tsv")], id_column="qid").scan()
    with pytest.raises(minilm_jax.UserError, match=r"a.txt is a text file, one text a line, without columns"):
        TextSource.of([str(tmp_path / "a.txt")], id_column="qid")
    kept = {p.name: p.read_bytes() for p in (tmp_path / "ints").iterdir()}
    with pytest.raises(minilm_jax.UserError, match="embedded with --id-column qid; give the same --id-column"):
        embed_corpus(TextSource.of([str(tmp_path / "a.jsonl")]), str(tmp_path / "ints"), jax_model, **kw)
    ids_file = tmp_path / "ints" / "shard-00001.ids.npy"
    ids_file.write_bytes(kept["shard-00001.ids.npy"][:-8] + np.int64(5).tobytes())
    with pytest.raises(minilm_jax.UserError, match="shard-00001.ids.npy is corrupt"):
        Corpus.open(str(tmp_path / "ints"))
    ids_file.write_bytes(kept["shard-00001.ids.npy"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "ints").iterdir()} == kept


def test_encode_blocks_equals_encode_block_by_block(real, jax_model, monkeypatch):
    """encode_blocks (pipelined over a stream) gives each block exactly what encode(block) gives, an empty
    block included, one call over more than encode's chunk too."""
    import importlib

    import minilm_jax
    from minilm_jax.encode import encode_blocks

    texts = real["texts"]
    blocks = [texts[:50], texts[50:51], [], texts[51:300], texts[300:]]
    got = list(encode_blocks(iter(blocks), jax_model))
    assert [len(b) for b in got] == [len(b) for b in blocks]
    for block, emb in zip(blocks, got):
        assert emb.tobytes() == minilm_jax.encode(block, jax_model).reshape(-1, 384).tobytes()
    # More sentences than a chunk: two tokeniser passes, 64 sentences at a time, and the same calls.
    monkeypatch.setattr(importlib.import_module("minilm_jax.encode"), "_CHUNK", 64)
    assert minilm_jax.encode(texts[51:300], jax_model).tobytes() == got[3].tobytes()


def test_retrieval_metrics_at_each_precision(jax_model, data_dir):
    """evaluate.py --evaluator retrieval --precision: float16 gives float32's metrics to 1e-3, binary less."""
    import minilm_jax
    from minilm_jax.errors import UsageError
    from minilm_jax.evaluators import build_evaluator, retrieval_from_pairs, retrieval_metrics
    from minilm_jax.pairs import Pairs

    rows = [line.split("\t") for line in (data_dir / "quora_dev.tsv").read_text(encoding="utf-8").splitlines()[1:401]]
    pairs = Pairs([r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows]), "quora_dev")
    data = retrieval_from_pairs(pairs)
    q, c = minilm_jax.encode(list(data.queries), jax_model), minilm_jax.encode(list(data.corpus), jax_model)
    base = retrieval_metrics(q, c, data)
    half = retrieval_metrics(q, c, data, precision="float16")
    bits = retrieval_metrics(q, c, data, precision="ubinary")
    assert abs(half["cosine_ndcg@10"] - base["cosine_ndcg@10"]) < 1e-3
    assert 0.5 < bits["cosine_ndcg@10"] <= base["cosine_ndcg@10"] + 0.02
    with pytest.raises(UsageError, match="--precision is for --evaluator retrieval"):
        build_evaluator("similarity", pairs=pairs, precision="int8")

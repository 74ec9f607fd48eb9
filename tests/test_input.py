"""The streamed training input (minilm_jax/input): files cut into pieces and read a window at a time,
per-device shares that are disjoint and cover the data, the no-duplicates walk, exact resume of a
stream from its state, the multi-dataset samplers against sentence-transformers' own, and the
errors a bad file gives. Real data (../shared/data), the real tokenizer; no model is run here
except in the last, slow test (a tiny model, two datasets, kill -9 and resume)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_user_error, read_pairs_tsv, write_subset
from minilm_jax import data as data_lib
from minilm_jax.errors import UsageError, UserError
from minilm_jax.input import sources
from minilm_jax.input.pipeline import count_rows, open_dataset
from minilm_jax.input.schedule import Schedule
from minilm_jax.input.sources import Reader
from minilm_jax.input.spec import dataset_specs
from minilm_jax.input.stream import ShardStream
from minilm_jax.train_config import TrainConfig


def _dataset(path, n_devices=1, **cfg):
    spec = dataset_specs(TrainConfig(train_file=(str(path),), **cfg))[0]
    needs = cfg.get("loss", "CosineSimilarityLoss") not in ("MultipleNegativesRankingLoss",)
    return open_dataset(spec, 0, 0, n_devices, score_required=needs, unit_interval=False, prompts=("", ""))


def _stream(ds, device=0, window=1 << 19, no_duplicates=False, seed=42):
    reader = Reader(ds.layouts, ds.spec.columns, ds.spec.score_scale, False, ds.spec.name)
    return ShardStream(reader, ds.pieces[device], seed=seed, dataset=0, device=device, window_rows=window,
                       no_duplicates=no_duplicates, positives_only=ds.spec.positives_only,
                       add_swapped=ds.spec.add_swapped, name=ds.spec.name, n_columns=ds.n_columns)


def _epoch(stream, k, epoch=0):
    batches = []
    while True:
        rows = stream.take(k, epoch)
        if not rows:
            return batches
        batches.append(rows)


@pytest.fixture(scope="module")
def quora(data_dir):
    return data_dir / "quora_train.tsv"


def test_a_dataset_that_fits_one_window_is_batched_as_before_streaming(quora):
    """One device, one window: the epoch's order is data.epoch_permutation's, so the reference
    recipe's batches did not change; the last batch is short, as sentence-transformers keeps it."""
    rows = read_pairs_tsv(quora)
    stream = _stream(_dataset(quora))
    for epoch in (0, 1):
        batches = _epoch(stream, 16, epoch)
        assert len(batches) == -(-len(rows) // 16)
        for step in (0, 1, len(batches) - 1):
            idx = data_lib.batch_indices(len(rows), 16, 42, epoch * len(batches) + step)
            assert [r[:2] for r in batches[step]] == [rows[i][:2] for i in idx]


@pytest.mark.parametrize("n_devices", [2, 3])
def test_device_shares_are_disjoint_and_cover_the_data(quora, tmp_path, monkeypatch, n_devices):
    """Each device (so each host) reads only its own pieces: the rows read add up to the data, every
    row once, with small pieces so that a device holds several."""
    monkeypatch.setattr(sources, "PIECE_BYTES", 200_000)
    rows = read_pairs_tsv(quora)
    ds = _dataset(quora, n_devices)
    seen, read = [], 0
    for d in range(n_devices):
        assert len(ds.pieces[d]) >= 2
        stream = _stream(ds, d, window=5000)
        got = [r for batch in _epoch(stream, 8) for r in batch]
        assert count_rows(ds, [d])[0] == len(got)
        read += stream.rows_read
        seen += [r[:2] for r in got]
    assert read == len(rows)  # no host read another's rows
    assert sorted(seen) == sorted(r[:2] for r in rows)


def test_the_no_duplicates_walk_over_one_window_is_sentence_transformers_rule(quora):
    """Over one window the walk is sampler.no_duplicates_batches exactly; over many small windows
    (deferred rows carried ahead) still no text twice in a batch and every row once per epoch."""
    from minilm_jax.pairs import load_pairs
    from minilm_jax.sampler import no_duplicates_batches, text_ids

    pairs = load_pairs(str(quora), positives_only=True)
    ds = _dataset(quora, loss="MultipleNegativesRankingLoss", positives_only=True, batch_size=64)
    whole = _epoch(_stream(ds, no_duplicates=True), 64)
    expected = no_duplicates_batches(text_ids(pairs.columns()), 64, 42, 0)
    assert [[r[:2] for r in b] for b in whole] == [[(pairs.sentence1[i], pairs.sentence2[i]) for i in b]
                                                   for b in expected]
    windows = _epoch(_stream(ds, window=700, no_duplicates=True), 64)
    for batch in windows:
        texts = [t for r in batch for t in set(r[:2])]
        assert len(set(texts)) == len(texts)
    assert sorted(r[:2] for b in windows for r in b) == sorted(zip(pairs.sentence1, pairs.sentence2))
    assert sum(len(b) < 64 for b in windows[:-3]) == 0  # short batches only at the epoch's end


@pytest.mark.parametrize("no_duplicates", [False, True])
def test_a_stream_resumes_from_its_state_to_the_row(quora, tmp_path, monkeypatch, no_duplicates):
    monkeypatch.setattr(sources, "PIECE_BYTES", 150_000)
    ds = _dataset(quora, loss="MultipleNegativesRankingLoss", add_swapped=True)
    straight = _stream(ds, window=3000, no_duplicates=no_duplicates)
    expected = [straight.take(32) for _ in range(2300)]  # past a window, a piece and the epoch's end
    for cut in (1, 97, 1100, 2057):
        stream = _stream(ds, window=3000, no_duplicates=no_duplicates)
        for _ in range(cut):
            stream.take(32)
        state = json.loads(json.dumps(stream.state()))  # as a checkpoint holds it
        resumed = _stream(ds, window=3000, no_duplicates=no_duplicates)
        resumed.restore(state)
        assert [resumed.take(32) for _ in range(cut, len(expected))] == expected[cut:], cut


def test_every_format_reads_the_same_rows_and_counts_them(quora, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_pairs_tsv(quora)[:3000]
    header = "sentence1\tsentence2\tscore\n"
    body = "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows)
    (tmp_path / "d.tsv").write_text(header + body, encoding="utf-8")
    with gzip.open(tmp_path / "d.tsv.gz", "wt", encoding="utf-8") as f:
        f.write(header + body)
    lines = "".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in rows)
    (tmp_path / "d.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    import csv

    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentence1", "sentence2", "score"])
        w.writerows(rows)
    pq.write_table(pa.table({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                             "score": [r[2] for r in rows]}), tmp_path / "d.parquet", row_group_size=700)
    want = sorted((a, b, float(s)) for a, b, s in rows)
    for name in ("d.tsv", "d.tsv.gz", "d.jsonl", "d.jsonl.gz", "d.csv", "d.parquet"):
        n_devices = 1 if name.endswith((".gz", ".csv")) else 3
        ds = _dataset(tmp_path / name, n_devices)
        got = []
        for d in range(n_devices):
            mine = [r for b in _epoch(_stream(ds, d, window=500), 16) for r in b]
            assert count_rows(ds, [d])[0] == len(mine), name
            got += mine
        assert sum(count_rows(ds, list(range(n_devices)))) == len(rows), name
        assert sorted(got) == want, name


def test_a_window_keeps_a_line_by_where_it_is_and_reads_it_again(quora, tmp_path):
    """A window holds a .tsv/.jsonl line as its file, byte offset and length (16 bytes), not its
    bytes, and reads it again when a batch takes it; a CSV row's values it keeps. A dataset of both
    gives every row once, and a line file cut short under the run is an error naming it."""
    import csv

    rows = read_pairs_tsv(quora)[:2000]
    (tmp_path / "a.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{a}\t{b}\t{s}\n" for a, b, s in rows[:1000]), encoding="utf-8")
    with open(tmp_path / "b.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["sentence1", "sentence2", "score"], *rows[1000:]])
    spec = dataset_specs(TrainConfig(train_file=(str(tmp_path / "a.tsv"), str(tmp_path / "b.csv"))))[0]
    ds = open_dataset(spec, 0, 0, 1, score_required=True, unit_interval=False, prompts=("", ""))
    stream = _stream(ds)
    got = [r for b in _epoch(stream, 16) for r in b]
    assert sorted(got) == sorted((a, b, float(s)) for a, b, s in rows)
    records = stream.records
    lines = [i for i in range(len(records)) if records.path(i).endswith("a.tsv")]
    assert len(records) == 2000 and len(lines) == 1000
    assert all(records._values[i] is None for i in lines)  # the lines' bytes are not held
    assert all(isinstance(records._values[i], list) for i in range(len(records)) if i not in set(lines))
    assert (records._file.itemsize + records._where.itemsize + records._length.itemsize) == 16

    lines_only = _stream(_dataset(quora))
    first = lines_only.take(16)
    assert lines_only.records._values is None and len(lines_only.records) == 32944
    with open(quora, "rb") as f:
        text = f.read()
    for i in (0, 1, 32943):  # each line as the file holds it
        where, length = lines_only.records.where(i), lines_only.records._length[i]
        assert lines_only.records.raw(i) == text[where:where + length]
    assert len(first) == 16
    short = tmp_path / "short.tsv"
    short.write_bytes(text[:text.rindex(b"\n", 0, 200_000) + 1])
    cut = _stream(_dataset(short))
    cut.take(16)
    with open(short, "r+b") as f:
        f.truncate(100_000)
    with pytest.raises(UserError, match="short.tsv ended at byte .* the file changed"):
        _epoch(cut, 16)


def test_files_named_by_url_stream_as_local_files_do(quora, model_path, tmp_path):
    """fsspec URLs (hf://datasets/... for a hub dataset's files; here fsspec's in-memory filesystem, as
    there is no network) are read as local files are: the same rows in every format, each shard
    reading its own pieces, a training run of the same steps; a glob that matches nothing, a missing
    file and an unknown protocol are one clear error each."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from minilm_jax import train_lib
    from tiny_model import write_tiny_model

    rows = read_pairs_tsv(quora)[:3000]
    fs = fsspec.filesystem("memory")
    text = "sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows)
    try:
        with fs.open("/urls/d.tsv", "wb") as f:
            f.write(text.encode("utf-8"))
        with fs.open("/urls/d.jsonl.gz", "wb") as f:
            f.write(gzip.compress("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n"
                                          for a, b, s in rows).encode("utf-8")))
        with fs.open("/urls/d.parquet", "wb") as f:
            pq.write_table(pa.table({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                                     "score": [r[2] for r in rows]}), f, row_group_size=700)
        want = sorted((a, b, float(s)) for a, b, s in rows)
        for url, n_devices in (("memory://urls/d.tsv", 3), ("memory://urls/*.jsonl.gz", 1),
                               ("memory://urls/d.parquet", 3)):
            ds = _dataset(url, n_devices)
            got = []
            for d in range(n_devices):
                mine = [r for b in _epoch(_stream(ds, d, window=500), 16) for r in b]
                assert count_rows(ds, [d])[0] == len(mine), url
                got += mine
            assert sorted(got) == want, url
        for url, needle in (("memory://urls/*.csv", "matches no file"), ("memory://urls/gone.tsv", "does not exist"),
                            ("nosuchprotocol://urls/d.tsv", "no filesystem serves this URL")):
            with pytest.raises(UserError, match=needle):
                _dataset(url)

        tiny = write_tiny_model(model_path, str(tmp_path / "tiny"))
        (tmp_path / "d.tsv").write_text(text, encoding="utf-8")
        dev = text[:text.index("\n", 20_000) + 1]  # the evaluation pairs: a few hundred of the rows
        (tmp_path / "dev.tsv").write_text(dev, encoding="utf-8")
        with fs.open("/urls/dev.tsv", "wb") as f:
            f.write(dev.encode("utf-8"))
        runs = {}
        for name, train, evaluation in (("local", str(tmp_path / "d.tsv"), str(tmp_path / "dev.tsv")),
                                        ("url", "memory://urls/d.tsv", "memory://urls/dev.tsv")):
            cfg = TrainConfig(model=tiny, train_file=(train,), eval_file=evaluation, output_dir=str(tmp_path / name),
                              max_steps=6, log_every=1)
            final = train_lib.train_and_evaluate(cfg, progress=False)
            records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            runs[name] = ([r["loss"] for r in records if "loss" in r], final["pearson_cosine"])
        assert len(runs["url"][0]) == 6 and runs["url"] == runs["local"]
        with pytest.raises(UserError, match="^memory://urls/bad.tsv line 2: "):
            with fs.open("/urls/bad.tsv", "wb") as f:
                f.write(b"sentence1\tsentence2\tscore\nno tabs here\n")
            from minilm_jax.pairs import load_pairs
            load_pairs("memory://urls/bad.tsv")
    finally:
        fs.rm("/urls", recursive=True)


def test_the_samplers_give_sentence_transformers_counts_and_rules():
    import torch
    from sentence_transformers.base.sampler import ProportionalBatchSampler, RoundRobinBatchSampler
    from torch.utils.data import BatchSampler, ConcatDataset, SequentialSampler

    sizes, batch = [160, 48, 97], 16
    batches = [-(-n // batch) for n in sizes]
    concat = ConcatDataset([list(range(n)) for n in sizes])
    samplers = [BatchSampler(SequentialSampler(range(n)), batch, drop_last=False) for n in sizes]
    for name, cls in (("proportional", ProportionalBatchSampler), ("round-robin", RoundRobinBatchSampler)):
        theirs = list(cls(concat, samplers, generator=torch.Generator(), seed=12))
        offsets = np.cumsum([0] + sizes)
        their_datasets = [int(np.searchsorted(offsets, b[0], side="right") - 1) for b in theirs]
        ours = Schedule(name, [1, 1, 1], 12, batches)
        our_datasets = [ours.dataset_of(s) for s in range(ours.steps_per_epoch)]
        assert ours.steps_per_epoch == len(theirs)
        assert np.bincount(our_datasets, minlength=3).tolist() == np.bincount(their_datasets, minlength=3).tolist()
        if name == "round-robin":
            assert our_datasets == their_datasets  # in turn: the same order
        assert ours.dataset_of(ours.steps_per_epoch) == our_datasets[0] or name == "proportional"


def test_weighted_shares_come_out_within_four_standard_deviations():
    weights, steps = [3.0, 1.0, 0.5], 20_000
    schedule = Schedule("weighted", weights, 7, None)
    counts = np.bincount([schedule.dataset_of(s) for s in range(steps)], minlength=3)
    p = np.asarray(weights) / sum(weights)
    assert np.all(np.abs(counts - steps * p) <= 4 * np.sqrt(steps * p * (1 - p))), counts
    assert schedule.dataset_of(123) == Schedule("weighted", weights, 7, None).dataset_of(123)  # of (seed, step)


def test_each_step_is_one_datasets_and_runs_its_loss(data_dir, tmp_path):
    """Two datasets with their own losses: every dispatch holds one dataset's rows and goes to the
    program of that dataset's loss."""
    from minilm_jax.encode import load
    from minilm_jax.input import open_run_data
    from minilm_jax.input.pipeline import InputPipeline

    config = tmp_path / "data.json"
    config.write_text(json.dumps({"datasets": [
        {"name": "quora", "files": str(data_dir / "quora_train.tsv"), "loss": "MultipleNegativesRankingLoss",
         "positives_only": True, "weight": 2},
        {"name": "stsb", "files": str(data_dir / "stsb_train.tsv"), "loss": "CoSENTLoss", "score_scale": 5}]}))
    cfg = TrainConfig(data_config=str(config), multi_dataset_sampler="weighted", max_steps=40, batch_size=16)
    model = load(None)
    run_data = open_run_data(cfg, model, 1, range(1))
    assert [type(loss).__name__ for loss in run_data.group_losses] == ["MultipleNegativesRankingLoss", "CoSENTLoss"]
    assert run_data.no_duplicates == (True, False)
    shapes = [data_lib.step_shapes(16, 2, 256) for _ in run_data.group_losses]
    pipeline = InputPipeline(list(run_data.datasets), run_data.schedule, model.tokenizer,
                             layout=data_lib.BatchLayout(16), shapes=shapes, steps_per_dispatch=1, seed=42,
                             window_rows=1 << 19, no_duplicates=run_data.no_duplicates)
    groups = []
    for dispatch, group, _ in pipeline.dispatches(0, 40):
        dataset = run_data.schedule.dataset_of(dispatch.first)
        assert group == run_data.datasets[dataset].group
        labels = dispatch.arrays["labels"][0, 0]
        if dataset == 0:
            assert np.all(labels == 1.0)
        groups.append(group)
    assert set(groups) == {0, 1}
    from minilm_jax.input.pipeline import first_rows

    head = first_rows(run_data.datasets[1], 5)  # what the model card describes: the file's first rows
    stsb_rows = read_pairs_tsv(data_dir / "stsb_train.tsv")[:5]
    assert [r[:2] for r in head] == [r[:2] for r in stsb_rows]
    assert [r[2] for r in head] == [float(r[2]) / 5 for r in stsb_rows]


def test_no_text_twice_in_a_batch_over_its_shards_and_hosts(data_dir):
    """With no duplicates, a step's global batch holds no text twice across its shards either (Quora's
    positives at batch 64 on 4 shards: with each shard walking alone, 32 of 251 steps held a text in
    two shards' blocks), and the batches are the same however the 4 shards are spread: 2 hosts of 2
    devices, the lower host's texts passed on as hosts.TextChain passes them, give 1 host of 4's."""
    from minilm_jax.encode import load
    from minilm_jax.input import open_run_data
    from minilm_jax.input.pipeline import InputPipeline

    cfg = TrainConfig(train_file=(str(data_dir / "quora_train.tsv"),), loss="MultipleNegativesRankingLoss",
                      positives_only=True, batch_size=64, max_steps=400)
    model = load(None)

    def pipeline(local: range, chain=None):
        run_data = open_run_data(cfg, model, 4, local)
        assert run_data.no_duplicates == (True,)
        return InputPipeline(list(run_data.datasets), run_data.schedule, model.tokenizer,
                             layout=data_lib.BatchLayout(64, 4, len(local), local.start),
                             shapes=[data_lib.step_shapes(16, 2, 256)], steps_per_dispatch=1, seed=42,
                             window_rows=1 << 19, no_duplicates=run_data.no_duplicates, chain=chain)

    class Chain:  # hosts.TextChain's hand-over between the two hosts of this test
        passed: dict = {}

        def __init__(self, process):
            self.process = process

        def lower(self, dataset, step):
            return self.passed.pop((dataset, step)) if self.process else set()

        def pass_on(self, dataset, step, taken):
            if self.process == 0:
                self.passed[(dataset, step)] = set(taken)

    one, hosts = pipeline(range(4)), [pipeline(range(0, 2), Chain(0)), pipeline(range(2, 4), Chain(1))]
    full = 0
    for step in range(400):
        _, shares = one._take(step, 0)
        if sum(len(share) for share in shares) < 64:
            break  # the epoch's end: short blocks
        full += 1
        texts = [t for share in shares for _, row in share for t in set(row[:2])]  # (a pair may repeat its text)
        assert len(texts) == len(set(texts)), f"step {step} holds a text in two rows"
        spread = [share for host in hosts for share in host._take(step, 0)[1]]
        assert spread == shares, f"step {step}: 2 hosts x 2 devices took other rows than 1 x 4"
    assert full > 150 and not Chain.passed


@pytest.mark.parametrize("make, needles", [
    (lambda d: ["--train-file", str(d / "nothing-*.tsv")], ["matches no file", "nothing-*.tsv"]),
    (lambda d: ["--train-file", str(d / "missing.tsv")], ["does not exist", "missing.tsv"]),
    (lambda d: ["--train-file", f"a={d / 'bad.tsv'}", f"b={d / 'good.tsv'}", "--dataset-weight", "a=0"],
     ["weight must be a positive number", "a=0"]),
    (lambda d: ["--train-file", f"a={d / 'bad.tsv'}", "--dataset-weight", "zzz=2"], ["zzz=2", "a"]),
    (lambda d: ["--train-file", str(d / "good.tsv"), "--loss", "CoSENTLoss", "--negative-column", "score"],
     ["CoSENTLoss", "2 text columns"]),
])
def test_bad_options_and_files_are_one_clear_error(make, needles, data_dir, tmp_path):
    import subprocess
    import sys

    from conftest import REPO_ROOT

    write_subset(data_dir / "quora_train.tsv", tmp_path / "good.tsv", 50)
    (tmp_path / "bad.tsv").write_text("sentence1\tsentence2\tscore\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "train.py", "--output-dir", str(tmp_path / "out"), "--no-progress",
                           *make(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert_user_error(proc, 2 if "weight" in needles[0] or "=" in needles[0] or "CoSENT" in needles[0] else 1, *needles)
    assert not (tmp_path / "out").exists()


def test_a_bad_row_deep_in_a_large_file_names_its_file_and_line(quora, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 100_000)
    lines = quora.read_text(encoding="utf-8").splitlines(keepends=True)
    bad_line = 30_001
    lines[bad_line - 1] = "only one field\n"
    path = tmp_path / "big.tsv"
    path.write_text("".join(lines), encoding="utf-8")
    ds = _dataset(path, 2)
    device = next(d for d in range(2) for p in ds.pieces[d]
                  if p.start <= sum(len(x.encode()) for x in lines[:bad_line - 1]) < p.end)
    with pytest.raises(UserError, match=f"{path} line {bad_line} has 1 fields, the header 3"):
        _epoch(_stream(ds, device, window=4000), 16)
    corrupt = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress(b"".join(json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i * 7}", "score": 1}).encode()
                                   + b"\n" for i in range(5000)))
    corrupt.write_bytes(whole[:len(whole) // 2])  # a download cut short
    with pytest.raises(UserError, match="cannot be read after row"):
        _epoch(_stream(_dataset(corrupt), window=100), 16)
    with pytest.raises(UsageError, match="positive number"):
        dataset_specs(TrainConfig(train_file=(f"a={quora}",), dataset_weight=("a=-1",)))


@pytest.mark.slow
def test_two_datasets_killed_at_random_points_resume_bit_identical(model_path, data_dir, tmp_path):
    """Two datasets (MultipleNegativesRankingLoss with no duplicates, CoSENTLoss), the weighted sampler,
    windows of 7 rows (so the resumed streams re-read a window and carry deferred rows), dropout on:
    killed with SIGKILL after a random checkpoint, twice, then run to the end: the uninterrupted run's
    model, bit for bit, and its losses step by step."""
    import random

    from test_train_resume import assert_ok, finish, finished_checkpoints, records, run, start, tensors, without_speed
    from tiny_model import write_tiny_model

    tiny = write_tiny_model(model_path, str(tmp_path / "tiny"))
    quora = write_subset(data_dir / "quora_train.tsv", tmp_path / "quora.tsv", 60)
    stsb = write_subset(data_dir / "stsb_train.tsv", tmp_path / "stsb.tsv", 45)
    config = tmp_path / "data.json"
    config.write_text(json.dumps([
        {"name": "quora", "files": quora.name, "loss": "MultipleNegativesRankingLoss", "weight": 2},
        {"name": "stsb", "files": [stsb.name], "loss": "CoSENTLoss", "score_scale": 5}]))
    steps, every = 36, 3

    def args(out):
        return ["--model", tiny, "--data-config", config, "--multi-dataset-sampler", "weighted", "--output-dir", out,
                "--max-steps", steps, "--batch-size", 8, "--checkpoint-every", every, "--log-every", 1,
                "--shuffle-window", 7, "--no-progress"]

    straight = tmp_path / "straight"
    p_straight = start(args(straight), tmp_path / "straight-log")
    killed = tmp_path / "killed"
    rng = random.Random(os.getpid())
    for attempt in range(2):
        target = every * rng.randint(2 + 4 * attempt, 4 + 4 * attempt)
        proc = start(args(killed), tmp_path / f"kill-{attempt}")
        deadline = time.monotonic() + 300
        while not [s for s in finished_checkpoints(killed / "checkpoints") if s >= target]:
            assert proc.poll() is None, Path(f"{tmp_path}/kill-{attempt}.err").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        finish(proc, tmp_path / f"kill-{attempt}")
    assert not (killed / "model").exists()
    assert_ok(run(args(killed), tmp_path / "last"))
    assert_ok(finish(p_straight, tmp_path / "straight-log"))
    a, b = tensors(straight), tensors(killed)
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])]
    recs = records(killed)
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, steps + 1))
    assert without_speed(recs) == without_speed(records(straight))
    final = json.loads((tmp_path / "last.out").read_text().strip().splitlines()[-1])
    # at most two programs per loss (a general program the last steps did not need may still be compiling)
    assert final["compiled_programs"] + final["cached_programs"] <= 4

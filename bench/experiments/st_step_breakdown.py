#!/usr/bin/env python
"""Experiment: where sentence-transformers' training step goes on this CPU (the same loop as
bench/train.py's): tokenisation, forward (loss), backward, clip + fused AdamW + zero_grad, timed per
phase over real Quora batches (median over steps), with dropout on and off.

    .venv/bin/python bench/experiments/st_step_breakdown.py [--threads 2] [--batch-size 16]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    common.offline_env()
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(common.default_model_path(), device="cpu")
    loss_fn = CosineSimilarityLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0, fused=True)
    s1, s2, sc = common.read_pairs_tsv(common.default_data_dir() / "quora_train.tsv")

    def step(i):
        idx = common.batch_indices(len(s1), args.batch_size, 42, i)
        t0 = time.perf_counter()
        f1, f2 = model.preprocess([s1[j] for j in idx]), model.preprocess([s2[j] for j in idx])
        t1 = time.perf_counter()
        loss = loss_fn([f1, f2], torch.tensor([sc[j] for j in idx], dtype=torch.float32))
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0

    print(f"machine: {common.machine_line()}; torch {torch.__version__}, {args.threads} threads, batch "
          f"{args.batch_size}, median of {args.steps} steps after 3 warm-up steps")
    print("| dropout | tokenise ms | forward ms | backward ms | clip+AdamW ms | step ms |")
    print("|---------|-------------|------------|-------------|---------------|---------|")
    for dropout in (True, False):
        model.train(dropout)  # eval mode turns dropout off, nothing else in this model differs
        for i in range(3):
            step(i)
        r = np.median(np.array([step(i) for i in range(3, 3 + args.steps)]), axis=0) * 1000
        print(f"| {'on' if dropout else 'off':7s} | {r[0]:11.1f} | {r[1]:10.1f} | {r[2]:11.1f} | {r[3]:13.1f} | "
              f"{r[4]:7.1f} |")


if __name__ == "__main__":
    main()

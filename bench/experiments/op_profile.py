#!/usr/bin/env python
"""Experiment: an op-level profile of our train step on the CPU, from jax.profiler's own trace
(XLA:CPU records one event per executed thunk). Prints the time per step by kind of op (the
fusion name without its number) and the most expensive single ops with their HLO line.

    .venv/bin/python bench/experiments/op_profile.py [--batch-size 16] [--affinity 0]
"""
import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import common  # noqa: E402

SKIP = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction")


def op_part(hlo: str, name: str) -> str:
    """Which part of the step an op belongs to, from its HLO metadata: forward or backward and the
    module (layers merged), or the file (optimizer, loss) it was traced from."""
    m = re.search(r"%" + re.escape(name) + r" = .*?metadata=\{op_name=\"([^\"]*)\"(?: stack_frame_id=(\d+))?", hlo)
    if not m:
        return "?"
    op_name, frame = m.group(1), m.group(2)
    pass_ = "backward" if "transpose(" in op_name else "forward"
    module = re.search(r"BertEncoder\)*/(.*)", op_name)
    if module:
        path = re.sub(r"layer_\d+", "layer_*", module.group(1)).rsplit("/", 1)[0]
        return f"{pass_}: {path}"
    files = frame_files(hlo, int(frame)) if frame else []
    if any("optimizer.py" in f or "/optax/" in f for f in files):
        return "optimizer (clip + AdamW)"
    mine = [Path(f).name for f in files if "/minilm_jax/" in f]
    return f"{pass_}: {mine[0] if mine else 'other'}"


@functools.lru_cache(maxsize=None)
def _frame_tables(hlo: str):
    def table(title):
        block = hlo.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0]
        return {int(line.split(" ", 1)[0]): line.split(" ", 1)[1] for line in block.splitlines() if line.strip()}

    return table("FileNames"), table("FileLocations"), table("StackFrames")


def frame_files(hlo: str, frame: int) -> list[str]:
    """The source files of a stack frame and its parents, innermost first."""
    names, locations, frames = _frame_tables(hlo)
    out, seen = [], set()
    while frame in frames and frame not in seen:
        seen.add(frame)
        loc, parent = map(int, re.findall(r"=(\d+)", frames[frame])[:2])
        file_id = int(re.search(r"file_name_id=(\d+)", locations[loc]).group(1))
        out.append(names[file_id].strip('"'))
        frame = parent
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="traced steps (default: %(default)s)")
    p.add_argument("--affinity", default=None)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--part", default=None, help="list the ops of this part (a prefix of its name) instead")
    p.add_argument("--hlo-out", default=None, help="also write the compiled step's HLO text here")
    args = p.parse_args()
    common.offline_env()
    if args.affinity:
        os.sched_setaffinity(0, common.parse_cpus(args.affinity))
    import jax
    import jax.numpy as jnp
    import numpy as np

    import minilm_jax
    from minilm_jax import data as data_lib, train_lib
    from minilm_jax.pairs import Pairs

    model = minilm_jax.load(common.default_model_path())
    s1, s2, sc = common.read_pairs_tsv(common.default_data_dir() / "quora_train.tsv")
    tokens = data_lib.tokenize_pairs(Pairs(s1, s2, np.asarray(sc)), model.tokenizer)
    _, _, arrays = next(data_lib.dispatch_groups(tokens, data_lib.BatchLayout(args.batch_size), 42, 0, 1, 1))
    batch = jax.tree.map(lambda x: x[0], arrays)
    cfg = train_lib.TrainConfig(batch_size=args.batch_size)
    sched = train_lib.learning_rate_schedule(cfg, 1000)
    tx = train_lib.make_optimizer(cfg, sched)
    step = jax.jit(functools.partial(train_lib.train_steps, axis_name=None, config=model.config, tx=tx,
                                     schedule=sched), donate_argnums=0)
    state = train_lib.init_state(jax.tree.map(jnp.array, model.params), tx)
    rng = jax.random.PRNGKey(0)
    hlo = step.lower(state, batch, rng).compile().as_text()
    if args.hlo_out:
        Path(args.hlo_out).write_text(hlo)
    for _ in range(3):
        state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    folder = tempfile.mkdtemp(prefix="minilm-op-profile-")
    t0 = common.now()
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)
    wall = (common.now() - t0) / args.steps
    trace = json.load(gzip.open(glob.glob(folder + "/**/*.trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(SKIP):
            per_op[e["name"]] += e["dur"] / 1000 / args.steps
    kinds, counts = collections.Counter(), collections.Counter()
    for name, ms in per_op.items():
        kind = re.sub(r"\.\d+$", "", name)
        kinds[kind] += ms
        counts[kind] += 1
    total = sum(kinds.values())
    print(f"machine: {common.machine_line()}; minilm-jax {common.repo_version()}; CPUs "
          f"{sorted(os.sched_getaffinity(0))}")
    print(f"batch {args.batch_size}, packed {batch['ids'].shape[-2:]}, jit step (no pmap): {1000 * wall:.0f} ms/step "
          f"wall while traced, {total:.0f} ms/step summed over ops")
    print("| op kind | ms/step | share | ops |")
    print("|---|---:|---:|---:|")
    for kind, ms in kinds.most_common(args.top):
        print(f"| {kind} | {ms:.1f} | {100 * ms / total:.0f}% | {counts[kind]} |")
    print()
    part_of = {name: op_part(hlo, name) for name in per_op}
    by_part = collections.Counter()
    for name, ms in per_op.items():
        by_part[part_of[name]] += ms
    print("| part of the step (from the op's HLO metadata) | ms/step | share |")
    print("|---|---:|---:|")
    for part, ms in by_part.most_common(args.top):
        print(f"| {part} | {ms:.1f} | {100 * ms / total:.0f}% |")
    print()
    print("| most expensive ops" + (f" of {args.part}" if args.part else "") + " | ms/step | HLO |")
    print("|---|---:|---|")
    top = args.top
    for name, ms in per_op.most_common():
        if args.part and not part_of[name].startswith(args.part):
            continue
        top -= 1
        if top < 0:
            break
        line = next((x.strip() for x in hlo.splitlines() if re.search(r"%" + re.escape(name) + r" = ", x)), "?")
        print(f"| {name} | {ms:.1f} | `{line.split(', metadata')[0][:110]}` |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What the train programs are made of, and what each costs to compile, on this machine's backend.

    .venv/bin/python bench/program_stats.py [--steps-per-dispatch 16] [--dtype bfloat16]

For each of the run's two programs (train_step.py: fast, general) built as train.py builds them
for the reference recipe (batch 16, all-MiniLM-L6-v2): seconds to trace and lower, seconds to
compile (no persistent cache), and the optimised HLO's size: instructions, fusions, while loops
(a lax.scan that is not unrolled is one), conditionals, and the custom calls (cuBLAS GEMMs on a
GPU: each distinct one is autotuned when the program compiles) and dots.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402


OPCODES = {"fusion", "while", "conditional", "dot", "custom-call"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps-per-dispatch", type=int, default=1, help="default: %(default)s")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    args = p.parse_args(argv)
    common.offline_env()
    import jax
    import numpy as np

    import minilm_jax
    from minilm_jax import data as data_lib, train_lib, train_step

    model = minilm_jax.load(common.default_model_path())
    cfg = train_lib.TrainConfig(batch_size=args.batch_size, dtype=args.dtype, steps_per_dispatch=args.steps_per_dispatch)
    n = jax.device_count()
    spec = train_lib.step_spec(cfg, model, n)
    tx = train_lib.make_optimizer(cfg)
    state = jax.eval_shape(lambda: train_step.init_state(model.params, tx))
    if n > 1:
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((jax.local_device_count(), *x.shape), x.dtype), state)
    print(f"# bench/program_stats.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {common.machine_line()}; backend {jax.default_backend()}, {n} device(s); shapes {spec.shapes}")
    print(common.versions_line())
    rows = []
    for program in train_step.PROGRAMS:
        batches = data_lib.example_dispatch(spec.shapes, jax.local_device_count(), args.steps_per_dispatch, program)
        batches["learning_rate"] = np.zeros((jax.local_device_count(), args.steps_per_dispatch), np.float32)
        fn = train_step.step_program(spec, program, n)
        t0 = time.perf_counter()
        lowered = fn.lower(state, batches, jax.ShapeDtypeStruct((2,), np.uint32), tx.as_inputs())
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        hlo = compiled.as_text()
        # Every instruction of every computation (fused ones included): "name = type opcode(operands)".
        ops = collections.Counter(m.group(1) for m in re.finditer(r" ([a-z][a-z0-9\-]*)\(", hlo)
                                  if m.group(1) in OPCODES)
        ops["instructions"] = sum(1 for line in hlo.splitlines() if " = " in line)
        custom = collections.Counter(m.group(1) for m in re.finditer(r'custom_call_target="([^"]+)"', hlo))
        rows.append([program, f"{t1 - t0:.1f}", f"{t2 - t1:.1f}", ops["instructions"], ops["fusion"], ops["while"],
                     ops["conditional"], ops["dot"], sum(custom.values()),
                     ", ".join(f"{k} {v}" for k, v in custom.most_common(4)) or "-"])
    print(common.table(["program", "lower s", "compile s", "HLO instructions", "fusions", "while", "conditional",
                        "dot", "custom calls", "top custom calls"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

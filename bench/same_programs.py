#!/usr/bin/env python
"""Do two checkouts compile all-MiniLM-L6-v2 to the same programs? Prints, for each checkout, a
hash of the lowered StableHLO of the recipe's two train programs (fast, general) and of one encode
program; equal hashes mean the same computation, hence the same results and speed.

    python bench/same_programs.py /path/to/checkout_a /path/to/checkout_b

Each checkout runs in its own process (same venv). Measured for the module-stack change (issue 20):
main at 165ee08 and the branch gave equal hashes for all three.
"""

import json
import subprocess
import sys

_PROBE = r'''
import dataclasses, hashlib, importlib, inspect, json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import minilm_jax
from minilm_jax import data as data_lib, train_lib, train_step
model = minilm_jax.load()
cfg = train_lib.TrainConfig()
spec = train_lib.step_spec(cfg, model, 1)
tx = train_lib.make_optimizer(cfg)
state = train_step.init_host_state(model.params, tx)
out = {}
for program in ("fast", "general"):
    s = spec if program == "fast" else dataclasses.replace(spec, gradcache=False)
    batches = data_lib.example_dispatch(s.shapes, 1, 1, program)
    batches["learning_rate"] = np.zeros((1, 1), np.float32)
    text = train_step.step_program(s, program, 1).lower(state, batches, np.zeros((2,), np.uint32),
                                                       tx.as_inputs()).as_text()
    out[program] = hashlib.sha256(text.encode()).hexdigest()[:16]
enc = importlib.import_module("minilm_jax.encode")
if "head" in inspect.signature(enc._embed_fn).parameters:
    fn = enc._embed_fn(model.config, model.sentence.head, "float32")
else:  # before the module stack
    fn = enc._embed_fn(model.config, "float32", True)
ids = np.zeros((32, 64), np.int32)
out["encode"] = hashlib.sha256(fn.lower(model.params, ids, ids).as_text().encode()).hexdigest()[:16]
print(json.dumps(out))
'''


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    results = {}
    for checkout in argv:
        proc = subprocess.run([sys.executable, "-c", _PROBE, checkout], capture_output=True, text=True, check=True)
        results[checkout] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(checkout, results[checkout])
    a, b = results.values()
    print("same programs" if a == b else "DIFFERENT programs: " + ", ".join(k for k in a if a[k] != b.get(k)))


if __name__ == "__main__":
    main(sys.argv[1:])

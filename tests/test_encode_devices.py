"""encode on several devices, on the device, and with a bounded number of compiled programs.

- Data parallel: on 8 fake CPU devices (a subprocess: the device count must be set before jax
  starts) each call's rows are split over the devices, and the embeddings equal one device's to
  1e-6, for every local device, a count and a list of devices, and as a device array.
- `convert_to_tensor=True` returns a jax.Array that stays on the devices and equals the numpy result.
- Programs: one call over sentences of every length compiles at most len(length_buckets) + 1
  programs and at least one per length bucket it meets (so the count is real); calls of every size
  never go past `program_bound`; GPUs and TPUs get 8 programs in all.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, cpu_devices_env, read_pairs_tsv
from tiny_model import write_tiny_model

TOL = 1e-6

EIGHT_DEVICES = r"""
import json, sys
import numpy as np
import importlib
import jax
import minilm_jax
encode_module = importlib.import_module("minilm_jax.encode")  # the package's `encode` is the function

model_path, sentences_file = sys.argv[1:3]
sentences = json.load(open(sentences_file, encoding="utf-8"))
model = minilm_jax.load(model_path)
devices = jax.local_devices()
assert len(devices) == 8, devices
one = minilm_jax.encode(sentences, model, devices=1)
report = {"n": len(sentences)}
for name, chosen in (("all", None), ("count 8", 8), ("list of 2", [devices[3], devices[5]])):
    got = minilm_jax.encode(sentences, model, devices=chosen)
    report[name] = float(np.abs(got - one).max())
raw1 = minilm_jax.encode(sentences, model, devices=1, normalize=False)
report["normalize=False"] = float(np.abs(minilm_jax.encode(sentences, model, normalize=False) - raw1).max())
tensor = minilm_jax.encode(sentences, model, convert_to_tensor=True)
report["tensor type"] = type(tensor).__name__
report["tensor devices"] = len(tensor.devices())
report["tensor"] = float(np.abs(np.asarray(tensor) - one).max())
alone = minilm_jax.encode(sentences[0], model, devices=[devices[6]], convert_to_tensor=True)
report["single on device 6"] = [str(d) for d in alone.devices()] == [str(devices[6])] and alone.shape == (384,)
report["single"] = float(np.abs(np.asarray(alone) - one[0]).max())
report["programs"] = encode_module.compiled_programs()
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def sentences(data_dir) -> list[str]:
    """Real sentences: 96 of STS-B dev (8 to 60 tokens) and one text of about 100 tokens made of them."""
    rows = read_pairs_tsv(data_dir / "stsb_dev.tsv")
    picked = list(dict.fromkeys(a for a, _, _ in rows))[:96]
    return picked + [" ".join(picked[:6])]


@pytest.fixture(scope="module")
def every_length(data_dir) -> list[str]:
    """Texts of every length from 1 word to past 256 tokens: prefixes of real STS-B sentences joined."""
    rows = read_pairs_tsv(data_dir / "stsb_dev.tsv")
    words = " ".join(a for a, _, _ in rows[:80]).split()
    return [" ".join(words[:k]) for k in range(1, 300, 3)]


def test_eight_devices_give_the_one_device_embeddings(sentences, model_path, tmp_path):
    path = tmp_path / "sentences.json"
    path.write_text(json.dumps(sentences), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, model_path, str(path)], env=cpu_devices_env(8),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("all", "count 8", "list of 2", "normalize=False", "tensor", "single"):
        assert report[name] <= TOL, f"{name}: {report[name]:.3g} from the one-device embeddings ({report})"
    assert report["tensor type"] == "ArrayImpl" and report["tensor devices"] == 8, report
    assert report["single on device 6"] is True, report


def test_convert_to_tensor_stays_on_the_device_and_equals_numpy(jax_model, sentences):
    import jax

    import minilm_jax

    picked = sentences[::7]
    host = minilm_jax.encode(picked, jax_model)
    dev = minilm_jax.encode(picked, jax_model, convert_to_tensor=True)
    assert isinstance(dev, jax.Array) and dev.shape == host.shape and dev.dtype == np.float32
    assert dev.devices() == set(jax.local_devices())
    np.testing.assert_array_equal(np.asarray(dev), host)  # the same programs: the same bits
    one = minilm_jax.encode(picked[2], jax_model, convert_to_tensor=True)
    assert isinstance(one, jax.Array) and one.shape == (384,)
    np.testing.assert_allclose(np.asarray(one), host[2], rtol=0, atol=TOL)  # alone: other padding
    empty = minilm_jax.encode([], jax_model, convert_to_tensor=True)
    assert isinstance(empty, jax.Array) and empty.shape == (0, 384)
    # It composes with jax: similarities on the device.
    sims = dev @ dev.T
    assert isinstance(sims, jax.Array)
    np.testing.assert_allclose(np.asarray(sims), host @ host.T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("devices, needle", [
    (0, "ask for 1 to"), (2, "ask for 1 to"), ("cpu", "not a jax device"), ([], "is empty"), (True, "devices must be"),
    ([None], "devices[0] is NoneType"),
])
def test_bad_devices_are_refused(jax_model, devices, needle):
    import minilm_jax

    with pytest.raises(minilm_jax.UserError, match=needle.replace("[", r"\[")):
        minilm_jax.encode(["a sentence"], jax_model, devices=devices)


def test_a_call_compiles_a_bounded_number_of_programs(model_path, tmp_path, every_length):
    """A tiny BERT (compiles in a fraction of a second) with the real tokenizer and max_seq_length 256,
    with a config no other test uses, so the programs counted are this test's."""
    import importlib

    import minilm_jax
    from minilm_jax.encode import compiled_programs, length_buckets, program_bound, row_buckets

    encode_module = importlib.import_module("minilm_jax.encode")
    folder = write_tiny_model(model_path, str(tmp_path / "tiny"), max_seq_length=256, intermediate_size=72)
    model = minilm_jax.load(folder)
    lengths_ladder = length_buckets(256)
    assert lengths_ladder[-1] == 256 and len(lengths_ladder) == 23
    texts = every_length

    # One call, one sentence per device call: it meets every length bucket, and compiles one program for each.
    met = {next(b for b in lengths_ladder if b >= len(t)) for t in model.tokenizer.token_ids(texts)}
    assert met == set(lengths_ladder), sorted(set(lengths_ladder) - met)
    before = compiled_programs()
    first = minilm_jax.encode(texts, model, batch_size=1)
    one_call = compiled_programs() - before
    assert one_call == len(met) == program_bound(model, batch_size=1) == 23

    # Calls of every size and text, the way a user's loop makes them: never past the bound.
    for n in (2, 5, 17, 33, len(texts)):
        for start in (0, 60):
            minilm_jax.encode(texts[start:start + n], model)
    total = compiled_programs() - before
    bound = program_bound(model)
    assert bound == len(lengths_ladder) * len(row_buckets(32)) == 92
    assert one_call < total <= bound, (one_call, total, bound)
    assert total - one_call <= bound - 23  # the batch-1 programs (rows 1) are among the 92
    assert encode_module._EMBED_FNS  # the programs counted are encode's own jitted functions
    np.testing.assert_allclose(minilm_jax.encode(texts[:5], model), first[:5], rtol=0, atol=TOL)


def test_accelerators_get_eight_programs_in_all():
    from minilm_jax.encode import length_buckets, row_buckets

    for backend in ("gpu", "tpu"):
        assert length_buckets(256, backend) == (16, 32, 48, 64, 96, 128, 192, 256)
        assert row_buckets(256, 8, backend) == (256,)
    assert length_buckets(128, "tpu")[-1] == 128 and length_buckets(512, "gpu")[-1] == 512
    assert row_buckets(32, 1, "cpu") == (1, 4, 16, 32) and row_buckets(256, 8, "cpu") == (8, 32, 128, 256)

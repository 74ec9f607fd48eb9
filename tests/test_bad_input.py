"""Bad input, hostile files and broken output folders never cost a traceback or a half-written folder.

One parametrised matrix over `minilm_jax.encode`, evaluate.py, train.py and both converters. Each
case ends in the correct result, or in one `error: ...` line that names the problem and the fix,
exit status 2 for usage errors and 1 for the rest, with nothing partial left behind: the output
folder absent or unchanged, and no `.NAME.tmp-*` / `.NAME.old-*` folder beside it.

The converters run as subprocesses (`run_cli`). evaluate.py and train.py mostly run in-process
(`main(argv)`, with the process's stdout/stderr captured at the file-descriptor level), so that
the cases fit in about a minute and a half; a few of their cases run as real subprocesses too.

A read-only folder and a full disk are real: the command runs in a private mount namespace
(`unshare -m`, root) under a read-only bind mount or a 200 KiB tmpfs, which vanish with it
(chmod does not stop root). Where that is not possible they are simulated in-process by making
the writer fail with the OSError the kernel would give.

The second part: a pytorch_model.bin whose pickle would run code is refused before anything runs.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from conftest import REPO_ROOT, assert_user_error, run_cli
from tiny_model import write_tiny_model

FROM_ST = REPO_ROOT / "convert" / "from_sentence_transformers.py"
TO_ST = REPO_ROOT / "convert" / "to_sentence_transformers.py"
HEADER = "sentence1\tsentence2\tscore"
# Six pairs with varied scores in [0, 1] (usable by train.py without --score-scale).
ROWS = [("A man is playing a flute.", "A man plays the flute.", 0.95),
        ("A woman is slicing an onion.", "A woman is cutting an onion.", 0.8),
        ("A dog runs in the park.", "Stocks fell sharply on Monday.", 0.0),
        ("Two kids play soccer.", "Children are playing football.", 0.7),
        ("The cat sleeps on the sofa.", "A cat is lying on a couch.", 0.6),
        ("He is cooking pasta.", "The train left the station.", 0.1)]


# ----------------------------------------------------------------------------- shared resources

@dataclasses.dataclass(frozen=True)
class Resources:
    tiny: str  # sentence-transformers folder, tiny random BERT, real tokenizer, max_seq_length 256
    tiny_jax: str  # the same as a minilm-jax folder
    real: str  # the real all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def res(model_path, tmp_path_factory) -> Resources:
    base = tmp_path_factory.mktemp("bad_input_models")
    return Resources(write_tiny_model(model_path, str(base / "tiny"), max_seq_length=256),
                     write_tiny_model(model_path, str(base / "tiny_jax"), kind="minilm-jax", max_seq_length=256),
                     model_path)


@dataclasses.dataclass(frozen=True)
class Ctx:
    tmp: Path  # this case's own folder
    res: Resources

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    def tsv(self, name: str = "pairs.tsv", rows=ROWS, header: str = HEADER, eol: str = "\n") -> Path:
        return self.file(name, eol.join([header, *("\t".join(map(str, r)) for r in rows)]) + eol)

    def model(self, kind: str = "st", name: str = "model", drop: tuple = ()) -> Path:
        src = self.res.tiny if kind == "st" else self.res.tiny_jax
        dst = self.tmp / name
        shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in drop and Path(d) == Path(src)])
        return dst

    @property
    def run_dir(self) -> Path:
        return self.tmp / "run"


@pytest.fixture
def ctx(tmp_path, res) -> Ctx:
    return Ctx(tmp_path, res)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def snapshot(path: Path):
    """None when absent; else every file's and folder's relative path with a hash of its bytes."""
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(path.rglob("*"))}


# ----------------------------------------------------------------------------- running the tools

@functools.cache
def _script(name: str):
    path = REPO_ROOT / name
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # convert/_cli.py
    spec = importlib.util.spec_from_file_location(f"_bad_input_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(script: str, argv: list, capfd, monkeypatch) -> subprocess.CompletedProcess:
    """A command line's main(argv) in this process, as a CompletedProcess (stdout/stderr from the fds)."""
    import minilm_jax.compilation_cache

    monkeypatch.setattr(minilm_jax.compilation_cache, "enable_compilation_cache", lambda path=None: None)
    module = _script(script)
    capfd.readouterr()
    code = 0
    try:
        module.main([str(a) for a in argv])
    except SystemExit as e:  # anything else is a bug and fails the test with its traceback
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess([script, *argv], code, out, err)


@functools.cache
def mount_namespaces() -> bool:
    """Whether this process may mount in a private mount namespace (root with unshare).
    MINILM_JAX_TEST_SIMULATE_FS=1 forces the in-process simulation instead."""
    if os.environ.get("MINILM_JAX_TEST_SIMULATE_FS") == "1" or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=16k tmpfs "$1"', "sh", d],
                               capture_output=True)
    return probe.returncode == 0


FS_SETUP = {
    # $D: the folder OUT lives in. Read-only: a read-only bind mount of it onto itself.
    "readonly": 'mount --bind "$D" "$D" && mount -o remount,bind,ro "$D"',
    # Full: a 200 KiB tmpfs (a tiny model is ~8 MB).
    "full": 'mount -t tmpfs -o size=200k tmpfs "$D"',
    # Full, with a previous export already there: room for it and 256 KiB more.
    "full-with-old": 'mount -t tmpfs -o size="$(( $(du -sk "$OLD" | cut -f1) + 256 ))k" tmpfs "$D" && cp -r "$OLD" "$D/out"',
}


def run_in_mount_namespace(fs: str, folder: Path, report: Path, old: Path | None, *args) -> subprocess.CompletedProcess:
    """`python ARGS` in a private mount namespace set up by FS_SETUP[fs]; what the command left in
    `folder` (and whether `folder/out` still equals `old`) is written to `report` before the
    namespace, and with it the mount, goes away."""
    after = 'ls -A "$D" > "$R"; if [ -n "$OLD" ]; then diff -r "$OLD" "$D/out" >/dev/null && echo "out unchanged" >> "$R"; fi'
    script = f'D="$1"; R="$2"; OLD="$3"; shift 3; {FS_SETUP[fs]} || exit 99; "$@"; rc=$?; {after}; exit $rc'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(folder), str(report), str(old or ""),
                           sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def simulate_fs(fs: str, monkeypatch) -> None:
    """Without mount namespaces: make the writer fail as the kernel would."""
    from minilm_jax import checkpoint_io

    if fs == "readonly":
        def mkdtemp(*args, dir=None, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

        monkeypatch.setattr(checkpoint_io.tempfile, "mkdtemp", mkdtemp)
    else:
        def save(tensors, path, metadata):
            Path(path).write_bytes(b"\0" * 1000)  # a partial file, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(checkpoint_io, "_save_safetensors", save)


# ----------------------------------------------------------------------------- the matrix

@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    tool: str  # encode | evaluate.py | train.py | from_st | to_st
    run: Callable[[Ctx], Any]  # encode: ctx -> result; a command line: ctx -> argv
    error: tuple | None = None  # (exit status, needle, ...) for the one error line; None: must succeed
    check: Callable | None = None  # success: check(ctx, result or CompletedProcess)
    watch: Callable[[Ctx], Path] | None = None  # a path that must be absent or unchanged after an error
    subprocess: bool = False  # evaluate.py/train.py: as a real subprocess instead of in-process
    fs: str | None = None  # a real read-only folder or full disk (converters): see FS_SETUP
    note: str = ""  # why a case is expected to fail for now


def encode_with(ctx: Ctx, sentences, model: str | None = None, **kwargs):
    import minilm_jax

    return minilm_jax.encode(sentences, minilm_jax.load(model or ctx.res.tiny), **kwargs)


def _check_empty(ctx, result):
    assert isinstance(result, np.ndarray) and result.shape == (0, 384) and result.dtype == np.float32


def _check_empty_string(ctx, result):
    import minilm_jax
    from minilm_jax.embedding import sentence_embeddings

    model = minilm_jax.load(ctx.res.tiny)
    assert model.tokenizer.token_ids([""])[0].tolist() == [101, 102]  # [CLS] [SEP]
    ids, mask = np.array([[101, 102, 0, 0]], np.int32), np.array([[1, 1, 0, 0]], np.int32)
    expected = np.asarray(sentence_embeddings(model.params, ids, mask, config=model.config))[0]
    assert result.shape == (64,) and np.all(np.isfinite(result))
    np.testing.assert_allclose(result, expected, atol=2e-6)
    assert abs(np.linalg.norm(result) - 1.0) < 1e-5


LONG = "word " * 20_000  # 100,000 characters


def _check_long(ctx, result):
    import minilm_jax

    model = minilm_jax.load(ctx.res.tiny)
    ids = model.tokenizer.token_ids([LONG])[0]
    assert len(LONG) == 100_000 and len(ids) == 256  # truncated to max_seq_length, [SEP] kept last
    assert ids[-1] == 102 and ids.tolist() == model.tokenizer.token_ids(["word " * 254])[0].tolist()
    np.testing.assert_array_equal(result, encode_with(ctx, ["word " * 254])[0])  # the same 256 tokens
    assert np.all(np.isfinite(result))


def _check_same_as_batch_1(ctx, result):
    np.testing.assert_allclose(result, encode_with(ctx, [r[0] for r in ROWS], batch_size=1), atol=2e-6)


def _evaluate_reference(ctx, rows) -> dict:
    import minilm_jax
    from minilm_jax.metrics import evaluate_pairs
    from minilm_jax.pairs import Pairs

    pairs = Pairs([r[0] for r in rows], [r[1] for r in rows], np.array([r[2] for r in rows], np.float64))
    return evaluate_pairs(minilm_jax.load(ctx.res.tiny), pairs, ("cosine",))


def evaluated(rows):
    """Success check for evaluate.py --json: the metrics of exactly these pairs."""

    def check(ctx, proc):
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["pairs"] == len(rows)
        reference = _evaluate_reference(ctx, rows)
        for key, value in reference.items():
            assert result[key] == pytest.approx(value, abs=1e-6), key

    return check


QUOTED = [('"Hello," she said.', 'He said "hi"', 0.9), ('"quoted"', "it's 5\" tall", 0.2),
          ('a "b" c', '""', 0.5)]


def _jsonl(*rows) -> str:
    return "".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in rows)


def _eval(pairs_fn, *extra):
    return lambda ctx: ["--model", ctx.res.tiny, "--pairs", pairs_fn(ctx), "--json", *extra]


def _train(data_fn=lambda ctx: ctx.tsv(), *extra, model=None, out=lambda ctx: ctx.run_dir):
    return lambda ctx: ["--model", model(ctx) if model else ctx.res.tiny, "--train-file", data_fn(ctx),
                        "--output-dir", out(ctx), "--max-steps", "2", "--batch-size", "8", "--no-progress",
                        *extra]


def _trained(ctx, proc):
    from minilm_jax import checkpoint_io

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["model"]).resolve() == (ctx.run_dir / "model").resolve()
    model = checkpoint_io.load_model(str(ctx.run_dir / "model"))
    assert all(np.all(np.isfinite(v)) for v in checkpoint_io.convert.flatten(model.params).values())
    assert (ctx.run_dir / "checkpoints" / "2").is_dir()  # 2 steps over 3 pairs with a batch of 16


def _converter(src_fn, *extra, out="out"):
    return lambda ctx: [src_fn(ctx), ctx.tmp / out, *extra]


def _with_config(ctx, **changes) -> Path:
    folder = ctx.model()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def _config_text(ctx, text: str) -> Path:
    folder = ctx.model()
    (folder / "config.json").write_text(text)
    return folder


def _truncated(ctx, kind="st") -> Path:
    folder = ctx.model(kind)
    weights = folder / ("model.safetensors" if kind == "st" else "params.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _reshaped(ctx) -> Path:
    from safetensors.numpy import load_file, save_file

    folder = ctx.model()
    state = load_file(str(folder / "model.safetensors"))
    state["embeddings.LayerNorm.weight"] = state["embeddings.LayerNorm.weight"][:63]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


# -- hand-written PyTorch zip checkpoints (no torch needed)

class Payload:
    """Unpickling this calls fn(*args): what a hostile pickle does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def write_torch_zip(path: Path, pickle_bytes: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """The zip layout torch.save writes: archive/data.pkl, archive/data/<key>, archive/version."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


def _op_str(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def _op_int(n: int) -> bytes:
    if 0 <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def tensor_pickle(entries: dict[str, tuple[str, int, tuple, tuple]]) -> bytes:
    """A state-dict pickle as torch writes it: name -> (storage key, offset, size, stride) of FloatStorages."""
    body = b""
    for name, (key, offset, size, stride) in entries.items():
        pid = b"(" + _op_str("storage") + _op_global("torch", "FloatStorage") + _op_str(key) + _op_str("cpu") + \
            _op_int(1) + b"tQ"
        args = b"(" + pid + _op_int(offset) + b"(" + b"".join(map(_op_int, size)) + b"t" + \
            b"(" + b"".join(map(_op_int, stride)) + b"t" + b"\x89" + _op_global("collections", "OrderedDict") + b")Rt"
        body += _op_str(name) + _op_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"
    return b"\x80\x02" + _op_global("collections", "OrderedDict") + b")R(" + body + b"u."


def sentinel() -> Path:
    return Path(tempfile.gettempdir()) / f"minilm-jax-pwned-{uuid.uuid4().hex}"


def _malicious_bin_only(ctx) -> Path:
    folder = ctx.model(drop=("model.safetensors",))
    target = ctx.tmp / "pwned"
    payload = OrderedDict({"embeddings.word_embeddings.weight": Payload(os.system, f"touch {target}")})
    write_torch_zip(folder / "pytorch_model.bin", pickle.dumps(payload, protocol=2))
    return folder


def _malicious_bin_beside_safetensors(ctx) -> Path:
    folder = ctx.model()
    payload = OrderedDict({"embeddings.word_embeddings.weight": Payload(os.system, f"touch {ctx.tmp / 'pwned'}")})
    write_torch_zip(folder / "pytorch_model.bin", pickle.dumps(payload, protocol=2))
    return folder


def _bin_beyond_storage(ctx) -> Path:
    """A tensor claiming a million floats over a storage of four: as_strided would read past the buffer."""
    folder = ctx.model(drop=("model.safetensors",))
    pkl = tensor_pickle({"embeddings.LayerNorm.weight": ("0", 0, (1_000_000,), (1,))})
    write_torch_zip(folder / "pytorch_model.bin", pkl, {"0": np.ones(4, np.float32).tobytes()})
    return folder


# -- weights with a NaN or an infinity

BAD_TENSOR = {"st": "encoder.layer.1.attention.self.query.weight", "jax": "encoder/layer_1/attention/query/kernel"}


def _nonfinite(ctx, kind: str = "st", value: float = float("nan"), where=(3, 5)) -> Path:
    """A copy of the tiny model with one weight set to `value` (in its own file's tensor names)."""
    from safetensors.numpy import load_file, save_file

    folder = ctx.model(kind)
    path = folder / ("model.safetensors" if kind == "st" else "params.safetensors")
    state = load_file(str(path))
    state[BAD_TENSOR[kind]][where] = value
    save_file(state, str(path), metadata={"format": "pt" if kind == "st" else "minilm-jax"})
    return folder


def _nonfinite_bin(ctx) -> Path:
    """The same, as a pytorch_model.bin (torch's zip layout, written by hand): an infinity."""
    from safetensors.numpy import load_file

    folder = ctx.model(drop=("model.safetensors",))
    state = load_file(str(Path(ctx.res.tiny) / "model.safetensors"))
    state.pop("embeddings.position_ids", None)  # an int64 buffer; the hand-written pickle holds floats
    state[BAD_TENSOR["st"]][0, 1] = -np.inf
    entries, storages = {}, {}
    for i, (name, array) in enumerate(state.items()):
        strides = tuple(int(np.prod(array.shape[d + 1:])) for d in range(array.ndim))
        entries[name] = (str(i), 0, tuple(array.shape), strides)
        storages[str(i)] = np.ascontiguousarray(array, np.float32).tobytes()
    write_torch_zip(folder / "pytorch_model.bin", tensor_pickle(entries), storages)
    return folder


NAN_AT = (BAD_TENSOR["st"], "has 1 non-finite value(s) (first: nan at index [3, 5])", "use a good copy of the model")


def _not_pwned(ctx, proc=None):
    assert not (ctx.tmp / "pwned").exists(), "pickled code ran"


def _converted_from_safetensors(ctx, proc):
    from minilm_jax import checkpoint_io

    _not_pwned(ctx)
    out, src = checkpoint_io.load_model(str(ctx.tmp / "out")), checkpoint_io.load_model(ctx.res.tiny)
    a, b = checkpoint_io.convert.flatten(out.weights()), checkpoint_io.convert.flatten(src.weights())
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _pre_existing_out(ctx) -> list:
    (ctx.tmp / "out").mkdir()
    (ctx.tmp / "out" / "keep.txt").write_text("precious")
    return [ctx.res.tiny, ctx.tmp / "out"]


def _parent_is_file(ctx) -> list:
    ctx.file("afile", "not a folder")
    return [ctx.res.tiny_jax, ctx.tmp / "afile" / "out"]


def _out(ctx) -> Path:
    return ctx.tmp / "out"


def _run_dir(ctx) -> Path:
    return ctx.run_dir


def _non_run_folder(ctx) -> list:
    ctx.run_dir.mkdir()
    (ctx.run_dir / "notes.txt").write_text("my notes, not a training run")
    return _train()(ctx)


def _model_folder_as_run(ctx) -> list:
    shutil.copytree(ctx.res.tiny, ctx.run_dir)  # --output-dir pointed at a model folder by mistake
    return _train()(ctx)


def _output_dir_is_file(ctx) -> list:
    ctx.run_dir.write_text("a file")
    return _train()(ctx)


PATCH = "needs the train_lib patch in the report (train.py writes OUTPUT before checking its inputs)"

CASES = [
    # --- minilm_jax.encode (in-process)
    Case("encode-none-among-sentences", "encode", lambda ctx: encode_with(ctx, ["fine", None]),
         error=(1, "sentences[1] is NoneType", "not a string")),
    Case("encode-number-among-sentences", "encode", lambda ctx: encode_with(ctx, ["fine", 3.5]),
         error=(1, "sentences[1] is float", "pass only str items")),
    Case("encode-bytes-among-sentences", "encode", lambda ctx: encode_with(ctx, [b"bytes"]),
         error=(1, "sentences[0] is bytes", ".decode('utf-8')")),
    Case("encode-none-instead-of-list", "encode", lambda ctx: encode_with(ctx, None),
         error=(1, "must be a list of strings, got NoneType")),
    Case("encode-empty-list", "encode", lambda ctx: encode_with(ctx, [], model=ctx.res.real), check=_check_empty),
    Case("encode-empty-string", "encode", lambda ctx: encode_with(ctx, ""), check=_check_empty_string),
    Case("encode-100k-character-sentence", "encode", lambda ctx: encode_with(ctx, [LONG]),
         check=lambda ctx, r: _check_long(ctx, r[0])),
    Case("encode-batch-size-0", "encode", lambda ctx: encode_with(ctx, ["a"], batch_size=0),
         error=(1, "batch_size must be a positive integer, got 0")),
    Case("encode-batch-larger-than-data", "encode", lambda ctx: encode_with(ctx, [r[0] for r in ROWS], batch_size=1000),
         check=_check_same_as_batch_1),
    Case("encode-lone-surrogate", "encode", lambda ctx: encode_with(ctx, ["fine", "caf\udce9 au lait"]),
         error=(1, "sentences[1] is not valid Unicode text", "lone surrogate '\\udce9' at character 3",
                "decode the source properly")),
    Case("tokenize-lone-surrogate", "encode",
         lambda ctx: __import__("minilm_jax").tokenize(__import__("minilm_jax").load(ctx.res.tiny), ["\ud800", "ok"]),
         error=(1, "sentences[0] is not valid Unicode text", "lone surrogate '\\ud800' at character 0")),
    Case("encode-nan-weight", "encode", lambda ctx: encode_with(ctx, ["a"], model=str(_nonfinite(ctx))),
         error=(1, "model.safetensors: tensor", *NAN_AT)),

    # --- evaluate.py: pairs files (in-process, three as subprocesses)
    Case("evaluate-empty-file", "evaluate.py", _eval(lambda ctx: ctx.file("p.tsv", "")),
         error=(1, "p.tsv is empty", "header line")),
    Case("evaluate-header-only", "evaluate.py", _eval(lambda ctx: ctx.tsv(rows=[])),
         error=(1, "has a header but no rows", "add at least one pair"), subprocess=True),
    Case("evaluate-missing-column", "evaluate.py", _eval(lambda ctx: ctx.tsv(header="sentence1\tsentence2\tlabel")),
         error=(1, "has no column 'score'", "--score-column")),
    Case("evaluate-non-numeric-score", "evaluate.py",
         _eval(lambda ctx: ctx.tsv(rows=ROWS[:2] + [("a", "b", "high")] + ROWS[2:])),
         error=(1, "line 4", "score 'high' is not a number", "fix or remove the row")),
    Case("evaluate-nan-score", "evaluate.py", _eval(lambda ctx: ctx.tsv(rows=ROWS[:1] + [("a", "b", "nan")])),
         error=(1, "line 3", "'nan' is not finite")),
    Case("evaluate-infinite-score", "evaluate.py", _eval(lambda ctx: ctx.tsv(rows=ROWS + [("a", "b", "-inf")])),
         error=(1, "line 8", "'-inf' is not finite")),
    Case("evaluate-utf8-bom-works", "evaluate.py", _eval(lambda ctx: ctx.tsv(header="\ufeff" + HEADER)),
         check=evaluated(ROWS)),
    Case("evaluate-crlf-works", "evaluate.py", _eval(lambda ctx: ctx.tsv(eol="\r\n")), check=evaluated(ROWS),
         subprocess=True),
    Case("evaluate-quotes-in-tsv-work", "evaluate.py", _eval(lambda ctx: ctx.tsv(rows=QUOTED)), check=evaluated(QUOTED)),
    Case("evaluate-ragged-row", "evaluate.py", _eval(lambda ctx: ctx.tsv(rows=ROWS[:1] + [("a", "b", "0.5\textra")])),
         error=(1, "could not be parsed", "line 3", "same columns")),
    Case("evaluate-short-row", "evaluate.py", _eval(lambda ctx: ctx.file("p.tsv", f"{HEADER}\na\tb\t0.5\nc\td\n")),
         error=(1, "line 3", "score '' is not a number")),
    Case("evaluate-invalid-utf8", "evaluate.py",
         _eval(lambda ctx: ctx.file("p.tsv", f"{HEADER}\na\tb\t0.5\n".encode() + b"caf\xe9\tx\t0.7\n")),
         error=(1, "is not valid UTF-8", "save the file as UTF-8")),
    Case("evaluate-number-as-sentence-jsonl", "evaluate.py", _eval(lambda ctx: ctx.file("p.jsonl", _jsonl(
        ("a b", "c d", 0.5), (42, "e f", 0.7)))), error=(1, "p.jsonl line 2: sentence1 is int 42, not text")),
    Case("evaluate-null-sentence-jsonl", "evaluate.py", _eval(lambda ctx: ctx.file("p.jsonl", _jsonl(
        ("a b", "c d", 0.5), ("x", None, 0.7)))), error=(1, "p.jsonl line 2: sentence2 is NoneType None, not text")),
    Case("evaluate-lone-surrogate-jsonl", "evaluate.py", _eval(lambda ctx: ctx.file("p.jsonl", _jsonl(
        ("a b", "c d", 0.5)) + '{"sentence1": "caf\\udce9", "sentence2": "e", "score": 0.1}\n')),
         error=(1, "p.jsonl line 2: 'sentence1' holds the lone surrogate '\\udce9' at character 3", "remove it")),
    Case("evaluate-broken-line-jsonl", "evaluate.py", _eval(lambda ctx: ctx.file("p.jsonl", _jsonl(
        ("a b", "c d", 0.5)) + '{"sentence1": "x" "sentence2": "e", "score": 0.1}\n')),
         error=(1, "p.jsonl line 2 is not valid JSON", "one JSON object per line")),
    Case("evaluate-missing-pairs-file", "evaluate.py", _eval(lambda ctx: ctx.tmp / "nope.tsv"),
         error=(1, "does not exist")),
    Case("evaluate-batch-size-0", "evaluate.py", _eval(lambda ctx: ctx.tsv(), "--batch-size", "0"),
         error=(2, "--batch-size must be at least 1")),
    Case("evaluate-batch-larger-than-data", "evaluate.py", _eval(lambda ctx: ctx.tsv(), "--batch-size", "1000"),
         check=evaluated(ROWS)),
    Case("evaluate-unknown-similarity", "evaluate.py", _eval(lambda ctx: ctx.tsv(), "--similarity", "cosinus"),
         error=(2, "invalid choice: 'cosinus'", "see --help"), subprocess=True),
    # --- evaluate.py: model folders
    Case("evaluate-model-without-config", "evaluate.py",
         lambda ctx: ["--model", ctx.model(drop=("config.json",)), "--pairs", ctx.tsv()],
         error=(1, "lacks config.json", "point to a sentence-transformers or minilm-jax model folder")),
    Case("evaluate-model-config-not-json", "evaluate.py",
         lambda ctx: ["--model", _config_text(ctx, "{not json"), "--pairs", ctx.tsv()],
         error=(1, "config.json is not valid JSON", "fix or replace the file")),
    Case("evaluate-model-truncated-safetensors", "evaluate.py",
         lambda ctx: ["--model", _truncated(ctx), "--pairs", ctx.tsv()],
         error=(1, "model.safetensors is truncated or corrupt", "re-download or re-export")),
    Case("evaluate-model-with-infinite-weight", "evaluate.py",
         lambda ctx: ["--model", _nonfinite(ctx, value=float("inf")), "--pairs", ctx.tsv()],
         error=(1, BAD_TENSOR["st"], "first: inf at index [3, 5]")),

    # --- train.py (in-process, two as subprocesses)
    Case("train-dataset-and-train-file", "train.py", _train(lambda ctx: ctx.tsv(), "--dataset", "some/dataset"),
         error=(2, "--dataset, --train-file and --data-config each name the training data", "give one of them"),
         watch=_run_dir, subprocess=True),
    Case("train-batch-size-0", "train.py", _train(lambda ctx: ctx.tsv(), "--batch-size", "0"),
         error=(2, "--batch-size must be at least 1"), watch=_run_dir),
    Case("train-score-out-of-range", "train.py", _train(lambda ctx: ctx.tsv(rows=ROWS + [("a", "b", 5.0)])),
         error=(1, "line 8", "score 5.0 is outside [0, 1]", "--score-scale 5"), watch=_run_dir, subprocess=True,
         note=PATCH),
    Case("train-nan-score", "train.py", _train(lambda ctx: ctx.tsv(rows=[("a", "b", "NaN")] + ROWS)),
         error=(1, "line 2", "'NaN' is not finite"), watch=_run_dir, note=PATCH),
    Case("train-empty-file", "train.py", _train(lambda ctx: ctx.file("p.tsv", "")),
         error=(1, "is empty"), watch=_run_dir, note=PATCH),
    Case("train-model-without-weights", "train.py", _train(model=lambda ctx: ctx.model(drop=("model.safetensors",))),
         error=(1, "lacks model.safetensors or pytorch_model.bin"), watch=_run_dir, note=PATCH),
    Case("train-config-disagrees-with-weights", "train.py",
         _train(model=lambda ctx: _with_config(ctx, num_hidden_layers=7)),
         error=(1, "config.json has num_hidden_layers 7 but the weights hold 2 layers"), watch=_run_dir,
         note=PATCH),
    Case("train-model-with-nan-weight", "train.py", _train(model=_nonfinite),
         error=(1, *NAN_AT), watch=_run_dir),
    Case("train-output-dir-not-empty-not-a-run", "train.py", _non_run_folder,
         error=(1, "is not empty and holds no training run", "choose a new or empty folder"), watch=_run_dir, note=PATCH),
    Case("train-output-dir-is-a-model-folder", "train.py", _model_folder_as_run,
         error=(1, "is not empty and holds no training run", "choose a new or empty folder"), watch=_run_dir, note=PATCH),
    Case("train-output-dir-is-a-file", "train.py", _output_dir_is_file,
         error=(1, "run is a file", "--output-dir", "choose a folder path"), watch=_run_dir, note=PATCH),
    Case("train-output-dir-read-only", "train.py",
         _train(out=lambda ctx: ctx.tmp / "fs" / "run"),
         error=(1, "Read-only file system", "run"), fs="readonly"),
    Case("train-batch-larger-than-data", "train.py", _train(lambda ctx: ctx.tsv(rows=ROWS[:3]), "--batch-size", "16"),
         check=_trained),

    # --- the converters (subprocesses)
    Case("from-st-without-config", "from_st", _converter(lambda ctx: ctx.model(drop=("config.json",))),
         error=(1, "lacks config.json"), watch=_out),
    Case("from-st-without-weights", "from_st", _converter(lambda ctx: ctx.model(drop=("model.safetensors",))),
         error=(1, "lacks model.safetensors or pytorch_model.bin"), watch=_out),
    Case("from-st-truncated-safetensors", "from_st", _converter(_truncated),
         error=(1, "truncated or corrupt", "re-download or re-export"), watch=_out),
    Case("from-st-tensor-of-wrong-shape", "from_st", _converter(_reshaped),
         error=(1, "embeddings.LayerNorm.weight has shape [63], config.json needs [64]"), watch=_out),
    Case("from-st-config-disagrees-with-weights", "from_st",
         _converter(lambda ctx: _with_config(ctx, num_hidden_layers=7)),
         error=(1, "config.json has num_hidden_layers 7 but the weights hold 2 layers", "fix config.json"), watch=_out),
    Case("from-st-nan-weight", "from_st", _converter(_nonfinite), error=(1, *NAN_AT), watch=_out),
    Case("from-st-infinite-weight-in-pytorch-bin", "from_st", _converter(_nonfinite_bin),
         error=(1, "pytorch_model.bin: tensor", BAD_TENSOR["st"], "first: -inf at index [0, 1]"), watch=_out),
    Case("from-st-pickled-code-in-bin", "from_st", _converter(_malicious_bin_only),
         error=(1, "contains pickled code (posix.system)", "refusing to load it", "model.safetensors"),
         watch=_out, check=_not_pwned),
    Case("from-st-bin-tensor-beyond-its-storage", "from_st", _converter(_bin_beyond_storage),
         error=(1, "is not a valid PyTorch state dict", "reaches element 999999 of a storage of 4"), watch=_out),
    Case("from-st-safetensors-wins-over-malicious-bin", "from_st", _converter(_malicious_bin_beside_safetensors),
         check=_converted_from_safetensors),
    Case("from-st-out-exists-not-empty", "from_st", _pre_existing_out,
         error=(1, "exists and is not empty", "pass --overwrite"), watch=_out),
    Case("from-st-out-on-full-disk", "from_st", lambda ctx: [ctx.res.tiny, ctx.tmp / "fs" / "out"],
         error=(1, "No space left on device", "nothing was written", "out"), fs="full"),
    Case("to-st-overwrite-on-full-disk-keeps-old", "to_st",
         lambda ctx: [ctx.res.tiny_jax, ctx.tmp / "fs" / "out", "--overwrite"],
         error=(1, "No space left on device", "nothing was written"), fs="full-with-old"),
    Case("to-st-out-read-only", "to_st", lambda ctx: [ctx.res.tiny_jax, ctx.tmp / "fs" / "out"],
         error=(1, "Read-only file system", "out"), fs="readonly"),
    Case("to-st-out-parent-is-a-file", "to_st", _parent_is_file,
         error=(1, "afile is a file, not a folder", "choose another output path")),
    Case("to-st-given-a-sentence-transformers-folder", "to_st", _converter(lambda ctx: ctx.res.tiny),
         error=(2, "is a sentence-transformers folder", "use the other converter"), watch=_out),
    Case("to-st-nan-param", "to_st", _converter(lambda ctx: _nonfinite(ctx, "jax")),
         error=(1, "params.safetensors: tensor", BAD_TENSOR["jax"], "first: nan at index [3, 5]"), watch=_out),
    Case("to-st-truncated-params", "to_st", _converter(lambda ctx: _truncated(ctx, "jax")),
         error=(1, "params.safetensors is truncated or corrupt"), watch=_out),
    Case("to-st-missing-out-argument", "to_st", lambda ctx: [ctx.res.tiny_jax],
         error=(2, "the following arguments are required: out")),
]


def test_matrix_is_large_and_names_are_unique():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.tool for c in CASES} == {"encode", "evaluate.py", "train.py", "from_st", "to_st"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx: Ctx, capfd, monkeypatch):
    from minilm_jax.errors import UserError

    if case.tool == "encode":
        if case.error:
            with pytest.raises(UserError) as info:
                case.run(ctx)
            message = str(info.value)
            print(f"UserError: {message}")  # shown by pytest -rP: what the user sees
            assert "\n" not in message and info.value.exit_code == case.error[0]
            for needle in case.error[1:]:
                assert needle in message, f"{needle!r} not in {message!r}"
        else:
            result = case.run(ctx)
            print(f"result: {type(result).__name__} {getattr(result, 'shape', '')}")
            case.check(ctx, result)
        return

    argv = case.run(ctx)  # writes the case's files
    watched = case.watch(ctx) if case.watch else None
    before = snapshot(watched) if watched else None
    script = {"from_st": FROM_ST, "to_st": TO_ST}.get(case.tool, REPO_ROOT / case.tool)
    report = None
    if case.fs and mount_namespaces():
        (ctx.tmp / "fs").mkdir()
        report = ctx.tmp / "fs-report.txt"
        old = ctx.model("jax", "old") if case.fs == "full-with-old" else None
        proc = run_in_mount_namespace(case.fs, ctx.tmp / "fs", report, old, script, *argv)
        assert proc.returncode != 99, f"mount failed: {proc.stderr}"
    elif case.fs:
        if case.tool == "train.py":
            pytest.skip("simulating a read-only folder covers the converters' writer only")
        (ctx.tmp / "fs").mkdir()
        if case.fs == "full-with-old":
            ctx.model("jax", "fs/out")
            before = snapshot(ctx.tmp / "fs" / "out")
        simulate_fs(case.fs, monkeypatch)
        proc = run_main(str(script.relative_to(REPO_ROOT)), argv, capfd, monkeypatch)
    elif case.tool in ("from_st", "to_st") or case.subprocess:
        proc = run_cli(script, *argv)
    else:
        proc = run_main(case.tool, argv, capfd, monkeypatch)

    print(f"exit {proc.returncode}: " + (proc.stderr.strip() if case.error else proc.stdout.strip()[-300:]))
    if case.error:
        assert_user_error(proc, *case.error)
        if case.check:
            case.check(ctx, proc)
    else:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        case.check(ctx, proc)
    if watched is not None:
        after = snapshot(watched)
        assert after == before, (f"{watched} changed although the command failed: "
                                 f"{sorted(after) if isinstance(after, dict) else after}" + (f" ({case.note})" if case.note else ""))
    if report is not None:
        left = report.read_text().split("\n")
        expected = ["out", "out unchanged"] if case.fs == "full-with-old" else []
        assert [x for x in left if x] == expected, f"left in the output's folder: {left}"
    elif case.fs == "full-with-old":
        assert snapshot(ctx.tmp / "fs" / "out") == before
    assert leftovers(ctx.tmp) == []


# ----------------------------------------------------------------------------- pickled code never runs

PAYLOADS = {
    "os.system": lambda target: Payload(os.system, f"touch {target}"),
    "subprocess.call": lambda target: Payload(subprocess.call, ["touch", str(target)]),
    "builtins.exec": lambda target: Payload(exec, f"open({str(target)!r}, 'w').close()"),
    "builtins.eval": lambda target: Payload(eval, f"open({str(target)!r}, 'w').close()"),
    "io.open": lambda target: Payload(open, str(target), "w"),
}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_pickled_code_in_pytorch_model_bin_is_refused_before_it_runs(name, tmp_path, res):
    """A pytorch_model.bin whose pickle would create a file: refused by name, and the file never appears.
    The control proves the payload is live: plain pickle.loads of the same bytes does create its file."""
    import minilm_jax
    from minilm_jax.errors import UserError

    target, control = sentinel(), sentinel()
    try:
        # The payload sits where a tensor belongs, among real-looking entries, in torch's zip layout.
        state = OrderedDict({"format": ["pt", 1], "embeddings.word_embeddings.weight": PAYLOADS[name](target)})
        data = pickle.dumps(state, protocol=2)
        pickle.loads(pickle.dumps(PAYLOADS[name](control), protocol=2))  # the control, on a path of its own
        assert control.exists(), f"the {name} payload does not do what it should; the test proves nothing"

        folder = tmp_path / "model"
        shutil.copytree(res.tiny, folder, ignore=lambda d, names: ["model.safetensors"] if Path(d) == Path(res.tiny) else [])
        write_torch_zip(folder / "pytorch_model.bin", data)
        with pytest.raises(UserError, match=r"contains pickled code \(\w+\.\w+\) that a weights file does not need"):
            minilm_jax.load(folder)
        assert not target.exists(), f"{name} ran while loading pytorch_model.bin"
    finally:
        for p in (target, control):
            if p.exists():
                p.unlink()


def test_both_weight_files_present_reads_safetensors_and_never_the_bin(tmp_path, res):
    import minilm_jax

    target = sentinel()
    folder = tmp_path / "model"
    shutil.copytree(res.tiny, folder)
    write_torch_zip(folder / "pytorch_model.bin", pickle.dumps(
        OrderedDict({"embeddings.word_embeddings.weight": Payload(os.system, f"touch {target}")}), protocol=2))
    try:
        model = minilm_jax.load(folder)
        assert not target.exists()
        reference = minilm_jax.load(res.tiny)
        np.testing.assert_array_equal(minilm_jax.encode(["a test"], model), minilm_jax.encode(["a test"], reference))
    finally:
        if target.exists():
            target.unlink()


@pytest.mark.parametrize("size,stride,offset", [
    ((1_000_000,), (1,), 0),  # far past a 4-float storage
    ((2, 2), (2, 1), 1),  # one element past the end
    ((2 ** 40,), (1,), 0),  # would allocate 4 TiB
    ((3,), (-1,), 2),  # negative stride
    ((2,), (1,), -1),  # negative offset
])
def test_tensor_views_outside_their_storage_are_refused(tmp_path, size, stride, offset):
    from minilm_jax import checkpoint_io
    from minilm_jax.errors import UserError

    path = write_torch_zip(tmp_path / "pytorch_model.bin", tensor_pickle({"t": ("0", offset, size, stride)}),
                           {"0": np.arange(4, dtype=np.float32).tobytes()})
    with pytest.raises(UserError, match="is not a valid PyTorch state dict"):
        checkpoint_io.read_pytorch_bin(path)


def test_a_hand_written_pytorch_bin_reads_back(tmp_path):
    """The writer above is faithful: a view inside its storage reads back exactly."""
    from minilm_jax import checkpoint_io

    storage = np.arange(12, dtype=np.float32)
    path = write_torch_zip(tmp_path / "pytorch_model.bin",
                           tensor_pickle({"a": ("0", 0, (3, 4), (4, 1)), "b": ("0", 1, (2, 3), (1, 4))}),
                           {"0": storage.tobytes()})
    state = checkpoint_io.read_pytorch_bin(path)
    np.testing.assert_array_equal(state["a"], storage.reshape(3, 4))
    np.testing.assert_array_equal(state["b"], storage.reshape(3, 4)[:, 1:3].T)


# ----------------------------------------------------------------------------- a huge input

MEMORY_SCRIPT = """
import json, resource, sys
import minilm_jax

model = minilm_jax.load(sys.argv[1])
n = int(sys.argv[2])
sentences = [f"sentence {i} is about topic {i % 97} and item {i * 7919 % 100003}" for i in range(n)]
minilm_jax.encode(sentences[:: max(1, n // 2048)], model, batch_size=256)  # compile the shapes these need
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
emb = minilm_jax.encode(sentences, model, batch_size=256)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": n, "growth": (peak - base) * 1024, "output": emb.nbytes}))
"""


def test_encode_memory_is_bounded_by_the_batch_not_the_input(res):
    """Peak memory (ru_maxrss of a fresh process) while encoding 6,144 and 61,440 sentences: beyond the
    output array itself (N x D float32) it must not grow with N. Tokenising everything at once grew
    by ~3 KB a sentence (+178 MB from 6k to 61k here); encode now tokenises 8,192 at a time (+13 MB)."""
    beyond = {}
    for n in (6_144, 61_440):
        proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, res.tiny, str(n)], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=300,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                  p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)))
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["output"] == n * 64 * 4
        beyond[n] = result["growth"] - result["output"]
    mib = {n: round(b / 2 ** 20, 1) for n, b in beyond.items()}
    assert beyond[61_440] - beyond[6_144] < 64 * 2 ** 20, f"memory beyond the output grows with N (MiB): {mib}"
    assert beyond[61_440] < 160 * 2 ** 20, f"MiB beyond the output: {mib}"

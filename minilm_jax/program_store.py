"""Compiled train programs kept whole on disk, so that a rerun loads them without tracing them again.

JAX's persistent compilation cache (compilation_cache.py) saves compiling, but not what comes
before it: its key is the lowered program, so every run first traces and lowers the step. For the
train step that is most of what a rerun waits for (measured on 2 CPU cores, all-MiniLM-L6-v2,
batch 16): the fast program traces and lowers in 1.5 s and loads in 1.2 s; the general program,
which traces the encoder three times (GradCache), in 3.5 s and loads in 2.0-2.8 s.

Here a program is saved with jax.experimental.serialize_executable, under a key made of everything
that defines it without tracing it: the caller's description of the program (its StepSpec, which
fixes the maths and shapes, and the device count), the shapes of its arguments, the source of this
package, the versions of the libraries that build it, JAX's settings and XLA_FLAGS, and the
devices and CPU it runs on. Anything else changed misses the store, and the program is compiled
(or loaded from JAX's cache) as before and saved again. A file that does not check out (truncated,
damaged, written by another version of this format) is a miss too, and is replaced.

Not stored: a program of several processes (train_lib compiles those through JAX's cache, as each
process's pmap must), and any program of a process in which a function of this package was
replaced at run time (a monkeypatch), where the source on disk no longer says what runs.
MINILM_JAX_PROGRAM_STORE=off turns the store off.

A saved program is native code that loading runs, as an entry of JAX's cache is: the store lives
beside that cache, in a folder of the user's, and is trusted as it is.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import jax

FORMAT = b"minilm-jax program v1\n"
MAX_BYTES = 2 << 30  # the store's size; the least recently used programs go first beyond it
_SUFFIX = ".program"
_source_digest: str | None = None


def store_dir() -> Path | None:
    """The store, beside JAX's compilation cache (None while that cache is off)."""
    cache = jax.config.jax_compilation_cache_dir
    if not cache:
        return None
    return Path(cache).absolute().parent / (Path(cache).name + "-programs")


def _package_source() -> str:
    """sha256 of this package's Python source: a change to any module may change a program."""
    global _source_digest
    if _source_digest is None:
        root = Path(__file__).resolve().parent
        digest = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
        _source_digest = digest.hexdigest()
    return _source_digest


def _cpu_flags() -> str:
    """The instruction sets XLA:CPU compiled for (a store shared by machines of several CPUs)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _versions() -> str:
    names = ("jax", "jaxlib", "flax", "optax", "numpy")
    return repr([(n, getattr(sys.modules.get(n), "__version__", None)) for n in names])


def _signature(args: tuple) -> str:
    leaves, tree = jax.tree.flatten(args)
    return repr((str(tree), [(tuple(x.shape), str(x.dtype)) for x in leaves]))


def _library_dirs() -> tuple[str, ...]:
    import sysconfig

    paths = sysconfig.get_paths()
    return tuple({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths})


def _patched_from_outside() -> bool:
    """Whether a function of this package was replaced at run time by one defined elsewhere (a
    test's or a user's monkeypatch): the source on disk then no longer says what a program does."""
    root = os.path.realpath(Path(__file__).resolve().parent)
    allowed = (root, *_library_dirs())
    # Copies (dict.copy runs without a thread switch): another thread may import meanwhile.
    for name, module in sys.modules.copy().items():
        if module is None or not (name == "minilm_jax" or name.startswith("minilm_jax.")):
            continue
        top = vars(module).copy()
        namespaces = [("", top)]
        namespaces += [(v.__qualname__ + ".", dict(vars(v))) for v in top.values()
                       if isinstance(v, type) and v.__module__ == name]
        for owner, namespace in namespaces:
            for value in namespace.values():
                code = getattr(value, "__code__", None)
                if code is None:
                    continue
                filename = code.co_filename
                if filename.startswith("<frozen") or os.path.realpath(filename).startswith(allowed):
                    continue
                if owner and filename == "<string>" and value.__qualname__ == owner + value.__name__:
                    continue  # a method dataclasses wrote for its class
                return True
    return False


def enabled() -> bool:
    """MINILM_JAX_PROGRAM_STORE=off turns the store off."""
    return os.environ.get("MINILM_JAX_PROGRAM_STORE", "").lower() not in ("off", "0")


def program_key(description: str, *example_args: Any) -> str | None:
    """The store's key of the program `description` names for arguments shaped as example_args;
    None (not stored) where the store is off, where the description is not a stable one (an
    object's default repr, with its address), or where a function of this package was patched."""
    if not enabled() or " at 0x" in description or _patched_from_outside():
        return None
    devices = jax.devices()
    parts = [FORMAT.decode(), description, _signature(example_args), _package_source(), _versions(),
             repr(sorted(jax.config.values.items())), os.environ.get("XLA_FLAGS", ""),
             repr([(d.platform, d.device_kind) for d in devices]),
             repr((len(devices), jax.local_device_count(), jax.process_count())), _cpu_flags()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


# A compile option at its default value: it changes nothing in the program, only JAX's cache key. A
# program bound for the store is compiled with it, so it is compiled here and never loaded from
# JAX's cache: a program loaded from there serializes without its kernels, and the copy fails when
# run ("Function ... not found").
_FRESH = {"xla_llvm_disable_expensive_passes": False}


def compile_fresh(function, example_args: tuple):
    """`function` lowered for example_args and compiled, bypassing JAX's persistent cache (which is
    not written either: the store holds this program)."""
    lowered = function.lower(*example_args)
    try:
        from jax._src import config  # the thread-local form of a JAX setting
        no_cache_write = config.persistent_cache_min_compile_time_secs(float("inf"))
    except (ImportError, AttributeError, TypeError):
        import contextlib
        no_cache_write = contextlib.nullcontext()
    with no_cache_write:
        return lowered.compile(compiler_options=_FRESH)


def load(key: str):
    """The program saved under `key` (a jax.stages.Compiled), or None."""
    folder = store_dir()
    if folder is None:
        return None
    path = folder / (key + _SUFFIX)
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    body = blob[len(FORMAT) + 32:]
    if not blob.startswith(FORMAT) or blob[len(FORMAT):len(FORMAT) + 32] != hashlib.sha256(body).digest():
        _remove(path)  # damaged or foreign: compiled again and saved anew
        return None
    from jax.experimental import serialize_executable

    try:
        payload, in_tree, out_tree = pickle.loads(body)
        compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    except Exception:  # e.g. a program this jaxlib cannot load after all
        _remove(path)
        return None
    try:
        os.utime(path)  # recently used: the last to be evicted
    except OSError:
        pass
    return compiled


def save(key: str, compiled) -> bool:
    """Save `compiled` under `key`, whole or not at all; False where it cannot be saved (a program
    with constants passed as arguments, which serialize_executable leaves out, or an unwritable
    store)."""
    folder = store_dir()
    if folder is None or getattr(compiled, "const_args", None):
        return False
    from jax.experimental import serialize_executable

    try:
        body = pickle.dumps(serialize_executable.serialize(compiled), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return False
    from minilm_jax.corpus import atomic_write

    path = folder / (key + _SUFFIX)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(str(path), FORMAT + hashlib.sha256(body).digest() + body)
    except OSError:
        return False
    _evict(folder, keep=path)
    return True


def _evict(folder: Path, keep: Path) -> None:
    """Remove the least recently used programs while the store holds more than MAX_BYTES."""
    entries = []
    for path in folder.glob("*" + _SUFFIX):
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= MAX_BYTES:
            break
        if path != keep:
            _remove(path)
            total -= size
    for stale in folder.glob(".*.tmp"):  # atomic_write's file of a save killed midway, an hour ago or more
        try:
            if stale.stat().st_mtime < time.time() - 3600:
                stale.unlink()
        except OSError:
            pass


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


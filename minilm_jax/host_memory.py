"""How a training process on CPU keeps its step's memory mapped from one step to the next.

XLA:CPU allocates every execution's temporaries (about 160 MB for a batch-16 step) in one block
and frees it when the step ends. glibc serves a block that large with a fresh mmap and unmaps it
on free, so each step faulted its pages in again: about 46,000 minor page faults and 70-80 ms of
kernel CPU per step on 2 cores (bench/RESULTS.md). Two settings keep the block for the next step:

- glibc never mmaps a block and never trims its heap (mallopt), so a freed block stays in the heap;
- the step runs on the thread that calls it (jax_cpu_enable_async_dispatch off), which is the
  main thread, whose blocks come from glibc's main heap. A block freed on JAX's own execution
  thread would come from that thread's arena, which grows in heaps of at most 64 MB and so still
  maps a 160 MB block afresh. (Limiting glibc to one arena for every thread does the same for
  them, but makes XLA's compiler threads queue on its lock: compiles took 1.3-1.75x as long.)

JAX applies the dispatch setting only to single-device programs; pmap over several devices keeps
its own threads. The settings change where memory comes from, not what is computed: results are
bit for bit the same. Memory the process frees is kept for reuse rather than returned to the
system, which a training process, whose peak recurs every step, does not miss.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_LARGEST = 2**31 - 1  # mallopt takes an int

OPT_OUT = "MINILM_JAX_SYSTEM_MALLOC"  # set to 1 to keep glibc's and JAX's defaults


def keep_step_memory() -> bool:
    """Make both settings above. Call it at the start of a training process, before JAX's backend
    starts (the dispatch setting is read then). Returns whether they were made: not on another C
    library than glibc, nor with MINILM_JAX_SYSTEM_MALLOC=1 in the environment."""
    if not keep_freed_memory():
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def keep_freed_memory() -> bool:
    """glibc's part alone: never mmap a block, never trim the heap (what a process whose work runs
    on its main thread, as torch's does, needs)."""
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        return False
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success.
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _LARGEST))


def release_freed_memory() -> None:
    """Give the memory the process has freed back to the system (glibc's malloc_trim), once a burst
    of it is over: loading or compiling a program frees 1.1-2.5 times what the program keeps (the
    fast train program: 137 of 259 MB; the general one: 392 of 521 MB), which the settings above
    would otherwise hold for the rest of the run. Also where a run switches between its fast and
    general programs (train_lib._run), whose temporaries are two blocks that would otherwise both
    stay mapped."""
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def _glibc_function(name: str):
    """glibc's function `name` (None on another C library, or where it cannot be loaded)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None

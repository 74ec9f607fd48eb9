"""Programs compiled ahead of time, on a background thread, and what compiling them cost.

A run knows the shapes of its programs once its options are parsed and its data tokenised, so it
can lower and compile them while it prepares the rest (the state, the checkpoints, the evaluators,
the first batches), instead of paying for both in turn at its first step. Each program
is compiled (or loaded from JAX's persistent compilation cache) once; `get` waits for it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Callable

import jax

from minilm_jax import program_store
from minilm_jax.host_memory import release_freed_memory

_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_hits_by_thread: dict[int, int] = {}
_listening = threading.Lock()
_listener_installed = False


def _count_cache_hits(event: str, **kwargs) -> None:
    if event == _CACHE_HIT:
        thread = threading.get_ident()
        _hits_by_thread[thread] = _hits_by_thread.get(thread, 0) + 1


def _install_listener() -> None:
    global _listener_installed
    with _listening:
        if not _listener_installed:
            jax.monitoring.register_event_listener(_count_cache_hits)
            _listener_installed = True


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    name: str
    seconds: float  # lowering and compiling, or loading from the persistent cache
    from_cache: bool  # loaded from the program store or JAX's persistent compilation cache, not compiled


class AheadOfTime:
    """Compiles programs on background threads in the order they are submitted.

    submit(name, function, *example_args): lower `function` (a jax.jit or jax.pmap function) for
    arguments shaped as example_args (arrays or jax.ShapeDtypeStruct) and compile it.
    get(name): the compiled program, waiting for it if need be.
    """

    def __init__(self, threads: int = 1):
        _install_listener()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="minilm-jax-compile")
        self._futures: dict[str, concurrent.futures.Future] = {}
        # Saving a program to the store (program_store.py), apart from the compiles: close() lets a
        # save finish where it drops the compiles not yet begun.
        self._saves = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="minilm-jax-save")
        self.compiled: list[CompiledProgram] = []
        self.warm_ups: list[tuple[float, int]] = []  # (seconds, programs) of each run()

    def submit(self, name: str, function: Callable, *example_args: Any, call_compiled: bool = True,
               stored_as: str | None = None) -> None:
        """call_compiled False: get() returns `function` itself, whose first call then loads what this
        compile put in the persistent cache (for pmap over several processes, whose compiled
        executable takes global arrays where the pmapped function takes each process's own).
        stored_as: a description that defines the program (program_store.py), under which it is
        loaded whole from the program store, or compiled and saved there."""
        if name not in self._futures:
            self._futures[name] = self._pool.submit(self._compile, name, function, example_args, call_compiled,
                                                    stored_as if call_compiled else None)

    def submitted(self, name: str) -> bool:
        return name in self._futures

    def _compile(self, name: str, function: Callable, example_args: tuple, call_compiled: bool,
                 stored_as: str | None):
        thread = threading.get_ident()
        hits_before = _hits_by_thread.get(thread, 0)
        start = time.perf_counter()
        key = program_store.program_key(stored_as, *example_args) if stored_as else None
        executable = program_store.load(key) if key else None
        stored = executable is not None
        if not stored and key:
            executable = program_store.compile_fresh(function, example_args)
            self._saves.submit(program_store.save, key, executable)  # while the program runs
        elif not stored:
            executable = function.lower(*example_args).compile()
        release_freed_memory()
        seconds = time.perf_counter() - start
        self.compiled.append(CompiledProgram(name, seconds, stored or _hits_by_thread.get(thread, 0) > hits_before))
        return executable if call_compiled else function

    def run(self, name: str, warm_up: Callable[[], int]) -> None:
        """Run `warm_up` (which compiles programs by running them, and returns how many it compiled)
        on the compile thread, after what was submitted before; report() gives its time apart."""
        if name not in self._futures:
            self._futures[name] = self._pool.submit(self._warm, warm_up)

    def _warm(self, warm_up: Callable[[], int]) -> int:
        start = time.perf_counter()
        programs = warm_up()
        self.warm_ups.append((time.perf_counter() - start, programs))
        return programs

    def ready(self, name: str) -> bool:
        return name in self._futures and self._futures[name].done()

    def get(self, name: str):
        return self._futures[name].result()

    def forget(self, name: str) -> None:
        """Let go of the compiled program `name`, if it is done (one still compiling is left to finish)."""
        if name in self._futures and self._futures[name].done():
            del self._futures[name]

    def report(self) -> dict:
        """compile_seconds (every program's lowering and compiling or loading, whether the run waited
        for it or not), compiled_programs (how many were compiled, not loaded from the cache) and
        cached_programs; with a warm-up, evaluation_compile_seconds and evaluation_programs too."""
        report = {"compile_seconds": round(sum(p.seconds for p in self.compiled), 3),
                  "compiled_programs": sum(not p.from_cache for p in self.compiled),
                  "cached_programs": sum(p.from_cache for p in self.compiled)}
        if self.warm_ups:  # the evaluation's (encode's) programs, compiled or loaded by running them
            report.update(evaluation_compile_seconds=round(sum(s for s, _ in self.warm_ups), 3),
                          evaluation_programs=sum(n for _, n in self.warm_ups))
        return report

    def close(self, wait: bool = True) -> None:
        """wait=False: leave a compile in progress to its thread (a run that stops does not need it)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self._saves.shutdown(wait=True)

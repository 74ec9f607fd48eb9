"""JAX's persistent compilation cache, so a second run does not compile the same programs again.

The command lines turn it on; library users call `enable_compilation_cache()` themselves (a
library should not change process-wide JAX settings on import).
"""

from __future__ import annotations

import os


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("MINILM_JAX_CACHE_DIR") or os.path.join(base, "minilm_jax", "xla")


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Cache compiled XLA programs under `path` (default: $MINILM_JAX_CACHE_DIR or ~/.cache/minilm_jax/xla).
    MINILM_JAX_CACHE_DIR=off disables it. Returns the folder used, or None."""
    import jax

    path = path or default_cache_dir()
    if path == "off":
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path

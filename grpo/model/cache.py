"""The grpo-zero cache: where models built or fetched once per machine live, and how an entry is
written so that a build killed half-way never leaves one that looks complete.

`$GRPO_ZERO_CACHE`, default `~/.cache/grpo-zero`. Importing this module imports no torch, so a
command that only looks in the cache (`grpo fetch` on a second run) returns at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("GRPO_ZERO_CACHE", Path.home() / ".cache" / "grpo-zero"))


def build_once(final: Path, build, marker: str) -> Path:
    """`final`, built by `build(tmp)` unless `final/marker` exists.

    The directory is written atomically (built in a temporary sibling, then renamed), so a build
    killed half-way never leaves a cache entry that looks complete. Processes that want the same
    entry at once (test workers, ranks of a run) take turns on a lock file beside it: one builds,
    the others wait and then use its copy; where locks do not work (some network file systems)
    they build side by side and the first rename wins.
    """
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a+") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        except (ImportError, OSError):  # no fcntl (Windows) or no locks here: build side by side
            pass
        if (final / marker).exists():  # built while this process waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(tmp)
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished first: use its copy
                if not (final / marker).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final

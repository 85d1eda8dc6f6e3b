"""The study's pruned models on disk, by prune key: computed once, verified on every load.

`<study>/prune_cache/<key>.pt` holds the key and the prune-stage settings next to the model, so a file
that is not what its name says (copied over, truncated, from another study) is moved aside with one
warning line and the stage recomputed -- the cache can be wrong about nothing but speed. Computing
holds an exclusive lock on `<key>.lock` (fcntl, released by the kernel when the process dies, so a
killed trial or node never leaves a stale claim): two trials of one key compute it once, and the one
waiting takes over if the computing one dies. Each computation is recorded in `computed.log`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CACHE_FORMAT = "tpp-study-prune/1"


def _canonical(inputs: dict[str, Any]) -> str:
    return json.dumps(inputs, sort_keys=True, default=str)


class PruneCache:
    """Implements tpp.run.PrunedStore over a folder every node of the study sees."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str, inputs: dict[str, Any]) -> Any | None:
        """The cached model of `key`, or None (absent, or failed verification and moved aside)."""
        from tpp.checkpoint import CheckpointError, _load, pruned_from_dict

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            record = _load(path, "prune cache entry")
            if record.get("format") != CACHE_FORMAT:
                raise CheckpointError("not a prune cache entry")
            if record.get("key") != key:
                raise CheckpointError(f"it holds prune stage {record.get('key')!r}, not {key!r}")
            if _canonical(record.get("inputs", {})) != _canonical(inputs):
                raise CheckpointError("it was computed with other prune-stage settings")
            if "control" in record:  # an unpruned control's metrics (tpp.run.train_control)
                return {str(k): float(v) for k, v in record["control"].items()}
            return pruned_from_dict(record["pruned"], str(path))
        except (CheckpointError, KeyError, TypeError) as e:
            self._move_aside(path, str(e).splitlines()[0])
            return None

    def _move_aside(self, path: Path, why: str) -> None:
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}"
        bad = path.with_name(f"{path.name}.bad-{stamp}")
        why = why if len(why) <= 160 else why[:157] + "..."
        with contextlib.suppress(FileNotFoundError):  # another trial moved it first
            os.replace(path, bad)
        print(f"[tpp-study] warning: prune cache {path.name} failed verification ({why}); moved aside to "
              f"{bad.name}, recomputing", file=sys.stderr, flush=True)

    def save(self, key: str, inputs: dict[str, Any], pruned: Any) -> None:
        from tpp.checkpoint import atomic_save, pruned_to_dict

        body = {"control": dict(pruned)} if isinstance(pruned, dict) else {"pruned": pruned_to_dict(pruned)}
        atomic_save({"format": CACHE_FORMAT, "key": key, "inputs": inputs, **body},
                    self.path(key))

    @contextlib.contextmanager
    def locked(self, keys: list[str]) -> Iterator[None]:
        """Hold the computing lock of every key (taken in sorted order: no two holders deadlock)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        files = []
        try:
            for key in sorted(set(keys)):
                f = open(self.folder / f"{key}.lock", "a")  # noqa: SIM115 - held until the block ends
                files.append(f)
                fcntl.flock(f, fcntl.LOCK_EX)
            yield
        finally:
            for f in reversed(files):
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()

    def record(self, key: str, what: str) -> None:
        """One line per computation start/end (who computed what, and how often)."""
        with open(self.folder / "computed.log", "a") as f:
            f.write(f"{time.time():.3f} {key} {what} {socket.gethostname()}:{os.getpid()}\n")

    def computations(self, controls: bool = False) -> dict[str, int]:
        """How many times each prune stage's computation started (from `computed.log`); with `controls`,
        each unpruned control's instead (tpp.run.train_control)."""
        from tpp.control import CONTROL_PREFIX

        log = self.folder / "computed.log"
        counts: dict[str, int] = {}
        for line in log.read_text().splitlines() if log.is_file() else []:
            _, key, what, _ = line.split(" ", 3)
            if key.startswith(CONTROL_PREFIX) == controls:
                counts[key] = counts.get(key, 0) + (what == "start")
        return counts

    def get_or_compute(self, key: str, inputs: dict[str, Any],
                       compute: Callable[[], Any]) -> tuple[Any, str]:
        """The pruned model of `key` and how: "computed" here, or "reused" from the cache."""
        pruned = self.load(key, inputs)
        if pruned is not None:
            return pruned, "reused"
        with self.locked([key]):
            pruned = self.load(key, inputs)  # computed by whoever held the lock before us
            if pruned is not None:
                return pruned, "reused"
            self.record(key, "start")
            pruned = compute()
            self.save(key, inputs, pruned)
            self.record(key, "done")
        return pruned, "computed"

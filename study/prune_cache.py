"""Prune-stage reuse: trials that share `tpp.run.prune_key` share one pruned model.

The prune stage (the growing-penalty regularisation) does not depend on the finetuning LR, so a study
that sweeps the LR would otherwise repeat the most expensive stage once per LR. Two layers:

* a named Ray actor (one per study, cluster-wide, found by name from any node) that hands out
  *claims*: the first trial with a key computes, concurrent ones wait, later ones get the model from
  the object store. The actor puts the model into the object store itself so it owns it -- an object
  owned by a trial's worker would vanish when that trial ends. Claims are leases renewed by a
  heartbeat: if the computing trial dies (its process or node is gone) the lease runs out and the
  next waiter computes instead.
* `<study>/prune_cache/<key>.pt` (weights only) so a resumed study, or a restarted actor, reuses too.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

ACTOR_NAME = "prune_cache"
LEASE_S = 30.0  # a claim without a heartbeat for this long is considered dead
HEARTBEAT_S = 5.0
POLL_S = 0.5


def namespace(study_name: str) -> str:
    return f"tpp-study-{study_name}"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class PruneCacheActor:
    """Coordinates claims and holds ObjectRefs of finished pruned models (keyed by prune key)."""

    def __init__(self, cache_dir: str, lease_s: float = LEASE_S):
        self.cache_dir = Path(cache_dir)
        self.lease_s = lease_s
        self.refs: dict[str, list[ray.ObjectRef]] = {}
        self.owner: dict[str, str] = {}  # key -> the trial that computed it
        self.claims: dict[str, tuple[str, float]] = {}  # key -> (holder, last heartbeat)

    def claim(self, key: str, holder: str) -> tuple[str, Any]:
        """("ready", ([ref], owner)) | ("file", path) | ("compute", lease_s) | ("wait", holder)."""
        if key in self.refs:
            return "ready", (self.refs[key], self.owner.get(key, ""))
        path = self.cache_dir / f"{key}.pt"
        if path.is_file():
            return "file", str(path)
        current = self.claims.get(key)
        now = time.monotonic()
        if current is None or current[0] == holder or now - current[1] > self.lease_s:
            self.claims[key] = (holder, now)
            return "compute", self.lease_s
        return "wait", current[0]

    def heartbeat(self, key: str, holder: str) -> bool:
        current = self.claims.get(key)
        if current is not None and current[0] == holder:
            self.claims[key] = (holder, time.monotonic())
            return True
        return False

    def put(self, key: str, pruned: Any, holder: str) -> None:
        """Store a finished model; the actor owns the object, so it outlives the trial that made it."""
        self.refs[key] = [ray.put(pruned)]
        self.owner.setdefault(key, holder)
        self.claims.pop(key, None)

    def release(self, key: str, holder: str) -> None:
        """Give up a claim (the computing trial failed): the next waiter computes."""
        if self.claims.get(key, ("",))[0] == holder:
            self.claims.pop(key)

    def stats(self) -> dict[str, Any]:
        return {"keys": len(self.refs), "claims": len(self.claims)}


def start(study_name: str, cache_dir: Path) -> Any:
    """Create (or join) the study's cache actor. Called by the driver before the trials start."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return PruneCacheActor.options(name=ACTOR_NAME, namespace=namespace(study_name), get_if_exists=True
                                   ).remote(str(cache_dir))


def _actor(study_name: str) -> Any | None:
    try:
        return ray.get_actor(ACTOR_NAME, namespace=namespace(study_name))
    except ValueError:
        return None  # no coordinator (e.g. the stage called outside a study): the disk cache still works


class _Heartbeat:
    """Renews a claim while the prune stage runs (a background thread, stopped on exit)."""

    def __init__(self, actor: Any, key: str, holder: str, lease_s: float):
        self._stop = threading.Event()
        self._every = min(HEARTBEAT_S, lease_s / 4)
        self._thread = threading.Thread(target=self._run, args=(actor, key, holder), daemon=True)

    def _run(self, actor: Any, key: str, holder: str) -> None:
        while not self._stop.wait(self._every):
            # A missed beat (actor restarting) is harmless: only a lease without beats expires.
            with contextlib.suppress(Exception):
                ray.get(actor.heartbeat.remote(key, holder), timeout=HEARTBEAT_S)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


def _owner_file(path: Path) -> Path:
    return path.with_suffix(".owner")


def _how(owner: str, holder: str) -> str:
    """A trial that computed the model and is resumed (or retried) still counts as having computed it."""
    return "computed" if owner == holder else "reused"


def _save(path: Path, pruned: Any, holder: str, save: Callable[[Path, Any], None]) -> None:
    save(path, pruned)
    _owner_file(path).write_text(holder)


def _file_owner(path: Path) -> str:
    owner = _owner_file(path)
    return owner.read_text().strip() if owner.is_file() else ""


def get_or_compute(study_name: str, cache_dir: Path, key: str, holder: str, compute: Callable[[], Any],
                   save: Callable[[Path, Any], None], load: Callable[[Path], Any]) -> tuple[Any, str]:
    """The pruned model for `key` and how it was obtained: "computed" or "reused".

    `compute()` runs at most once per key across the study (unless its trial dies mid-way).
    `holder` (the trial id) identifies the claimant and, on resume, the trial that computed the model.
    """
    path = cache_dir / f"{key}.pt"
    actor = _actor(study_name)
    if actor is None:
        if path.is_file():
            return load(path), _how(_file_owner(path), holder)
        pruned = compute()
        _save(path, pruned, holder, save)
        return pruned, "computed"
    while True:
        state, payload = ray.get(actor.claim.remote(key, holder))
        if state == "ready":
            refs, owner = payload
            return ray.get(refs[0]), _how(owner, holder)
        if state == "file":
            pruned = load(Path(payload))
            owner = _file_owner(path)
            ray.get(actor.put.remote(key, pruned, owner or holder))
            return pruned, _how(owner, holder)
        if state == "compute":
            try:
                with _Heartbeat(actor, key, holder, payload):
                    pruned = compute()
                _save(path, pruned, holder, save)
            except BaseException:
                with contextlib.suppress(Exception):  # the lease expires anyway if this fails
                    ray.get(actor.release.remote(key, holder), timeout=10)
                raise
            ray.get(actor.put.remote(key, pruned, holder))
            return pruned, "computed"
        time.sleep(POLL_S)

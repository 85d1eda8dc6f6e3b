"""The study's one MLflow writer thread: delivers the outbox every few seconds, off Tune's loop.

Tune's loop only queues writes. What a resumed study relies on is kept by a barrier instead of a
blocking write per trial: `wait()` delivers everything queued so far, and the logger calls it just
before Tune saves its experiment state (trial statuses, checkpoints), so the state a restore reads
never runs ahead of MLflow, a SIGKILL included. (Ray's own background syncer is no fit: it copies
files; MLflow's async logging keeps no order across runs and cannot be told "all of it, now".)
"""

from __future__ import annotations

import logging
import threading

from study.outbox import Outbox

log = logging.getLogger("study.mlflow")


class Writer:
    """A daemon thread flushing `box` every `every_s` seconds and whenever `wait()` asks."""

    def __init__(self, box: Outbox, every_s: float):
        self.box, self.every_s = box, every_s
        self._cond = threading.Condition()
        self._asked = self._done = 0  # flush requests made / flush passes begun after them, finished
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tpp-mlflow-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._asked == self._done and not self._stop:
                    self._cond.wait(self.every_s)
                if self._stop:
                    return
                asked = self._asked
            try:
                self.box.flush(force=asked > self._done)
            except Exception:  # noqa: BLE001 - the writer must outlive one bad flush; the ops stay queued
                log.exception("MLflow writer: a flush failed")
            with self._cond:
                self._done = max(self._done, asked)
                self._cond.notify_all()

    def wait(self) -> None:
        """Deliver everything queued before this call (or find the store away: it stays queued)."""
        with self._cond:
            self._asked += 1
            asked = self._asked
            self._cond.notify_all()
            while self._done < asked and self._thread.is_alive():
                self._cond.wait(1.0)

    def stop(self) -> None:
        """End the thread after the flush it is in; what is still queued stays in the outbox."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

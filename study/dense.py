"""The study's dense model: trained once (or loaded from a checkpoint) before the first trial, where the
data is, with its progress on the terminal; saved in the study folder and logged on the study run."""

from __future__ import annotations

import sys
import time
from typing import Any

from study.config import StudyConfig
from study.errors import StudyError
from study.outbox import Outbox
from study.store import StudyFolder, StudyMeta
from study.text import fmt_duration


def _dense_task(run_cfg_dict: dict[str, Any], checkpoint: str | None,
                progress: Any = None) -> tuple[Any, list[dict[str, Any]]]:
    """Train (or load) the dense model where the data is (a Ray task: a GPU node if there is one);
    `progress(event)` sees each epoch (the embedded driver's progress line)."""
    from tpp.checkpoint import load_dense
    from tpp.config import RunConfig
    from tpp.run import load_run_data, model_spec, train_dense

    run_cfg = RunConfig.from_dict(run_cfg_dict)
    data = load_run_data(run_cfg)
    if checkpoint:
        return load_dense(checkpoint, expected=model_spec(run_cfg, data)), []
    history: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "epoch":
            history.append(event)
            if progress is not None:
                progress(event)

    return train_dense(run_cfg, data, on_event), history


class DenseProgress:
    """The dense training's progress: a tqdm bar on a terminal, else a line every tenth of the epochs."""

    def __init__(self, name: str, epochs: int):
        self.name, self.epochs, self.t0 = name, epochs, time.monotonic()
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, desc=f"[{name}] dense", unit="epoch", leave=False)

    def __call__(self, event: dict[str, Any]) -> None:
        done = event["epoch"] + 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"acc {event['test_acc']:.1f}%")
            if done == self.epochs:
                self.bar.close()
        elif done % max(self.epochs // 10, 1) == 0 or done == self.epochs:
            rate = (time.monotonic() - self.t0) / done
            print(f"[{self.name}] dense epoch {done}/{self.epochs}: test acc {event['test_acc']:.2f}% "
                  f"({rate:.2f} s/epoch, ETA {fmt_duration(rate * (self.epochs - done))})", flush=True)


def _dense(cfg: StudyConfig, folder: StudyFolder, meta: StudyMeta, gpu: float, embedded: bool) -> Any:
    """The study's dense model: from the study folder if present (resume), else trained/loaded once."""
    import ray

    from study.design import dense_run_config
    from tpp.checkpoint import load_dense, save_dense

    if folder.dense_path.is_file():
        return load_dense(folder.dense_path)
    run_cfg = dense_run_config(cfg)
    what = f"loading {cfg.dense.checkpoint}" if cfg.dense.checkpoint else \
        f"training it for {cfg.dense.epochs} epochs"
    print(f"[{cfg.name}] dense model {cfg.model.name} on {cfg.data.name}: {what}", flush=True)
    t0 = time.monotonic()
    try:
        if embedded:  # this process already holds the data and the libraries: no cold worker to start
            dense, history = _dense_task(run_cfg.to_dict(), cfg.dense.checkpoint,
                                         DenseProgress(cfg.name, run_cfg.dense_epochs))
        else:
            task = ray.remote(_dense_task).options(num_cpus=cfg.resources.cpus,
                                                   num_gpus=gpu and min(1.0, gpu), max_retries=1)
            dense, history = ray.get(task.remote(run_cfg.to_dict(), cfg.dense.checkpoint))
    except Exception as e:  # noqa: BLE001 - one line, whatever the dense stage raised (or Ray wrapped)
        cause = getattr(e, "cause", None) or e
        raise StudyError(f"dense: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}") from None
    save_dense(folder.dense_path, dense)
    acc = dense.metrics.get("dense_acc", float("nan"))
    print(f"[{cfg.name}] dense model: test accuracy {acc:.2f}% ({fmt_duration(time.monotonic() - t0)}), "
          f"saved to {folder.dense_path}", flush=True)
    box = Outbox(meta.tracking_uri, {"parent": meta.parent_run_id})
    rows = [(k, v, 0) for k, v in dense.metrics.items()]
    rows += [(f"dense/{k}", ev[k], ev["epoch"]) for ev in history for k in ("train_loss", "test_acc", "lr")]
    box.batch("parent", metrics=rows)
    box.drain(60)
    return dense

"""A study's store and folder when something is wrong with them, through the real CLI: a damaged
`study.json` or `mlflow.db`, a tracking URI that is not MLflow or does not answer, two studies creating one
new store at once, Ctrl-C while the dense model trains. Each is one line, a non-zero exit, no traceback, and
nothing left half-written; and a finished study's store is left in rollback mode (readable from read-only
media)."""

from __future__ import annotations

import http.server
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_study_run import tiny

BIN = Path(sys.executable).parent
TPP_STUDY, TPP_ANALYZE = str(BIN / "tpp-study"), str(BIN / "tpp-analyze")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _cli(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, says: str, code: int = 2) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny study: its storage folder (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("finished")
    cfg = tiny("ok", space={"pr": [0.5], "growth": [0.2], "seeds": [0]})
    (root / "ok.yaml").write_text(yaml.safe_dump(cfg))
    proc = _cli(TPP_STUDY, "run", "ok.yaml", "--storage", "studies", cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "studies"


def _copy(finished: Path, tmp_path: Path) -> Path:
    storage = tmp_path / "studies"
    shutil.copytree(finished, storage, symlinks=True)
    return storage


def test_a_finished_study_leaves_its_store_in_rollback_mode(finished):
    db = finished / "ok" / "mlflow.db"
    assert not Path(f"{db}-wal").exists()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_damaged_study_json_is_one_line_and_list_shows_the_others(finished, tmp_path):
    storage = _copy(finished, tmp_path)
    shutil.copytree(storage / "ok", storage / "broken", symlinks=True)
    text = (storage / "broken" / "study.json").read_text()
    (storage / "broken" / "study.json").write_text(text[: len(text) // 2])  # truncated
    listing = _cli(TPP_STUDY, "list", "--storage", str(storage), cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "damaged" in rows["broken"] and "completed" in rows["ok"], listing.stdout
    _one_line_error(_cli(TPP_STUDY, "status", "broken", "--storage", str(storage), cwd=tmp_path),
                    "study.json is damaged")
    _one_line_error(_cli(TPP_STUDY, "resume", "broken", "--storage", str(storage), cwd=tmp_path),
                    "study.json is damaged")


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_a_damaged_mlflow_db_is_one_line_in_every_command(finished, tmp_path, damage):
    storage = _copy(finished, tmp_path)
    db = storage / "ok" / "mlflow.db"
    data = db.read_bytes()
    db.write_bytes(os.urandom(len(data)) if damage == "random" else data[: len(data) // 2])
    for argv in ([TPP_STUDY, "status", "ok"], [TPP_STUDY, "resume", "ok"]):
        _one_line_error(_cli(*argv, "--storage", str(storage), cwd=tmp_path), "cannot be read")
    proc = _cli(TPP_ANALYZE, "ok", "--storage", str(storage), cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (storage / "ok" / "report").exists()


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        body = b"<html><body><h1>Welcome</h1>\n<p>some other service</p></body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_uri_that_is_not_mlflow_or_does_not_answer_leaves_nothing(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tiny("t")))
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        _one_line_error(_cli(TPP_STUDY, "run", "t.yaml", "--storage", "studies", "--tracking-uri", uri,
                             cwd=tmp_path), "not as an MLflow tracking server")
    finally:
        server.shutdown()
    _one_line_error(_cli(TPP_STUDY, "run", "t.yaml", "--storage", "studies", "--tracking-uri",
                         f"http://127.0.0.1:{_free_port()}", cwd=tmp_path), "does not answer")
    assert not (tmp_path / "studies").exists()  # "nothing started" left no .lock, no study.json, no folder


def test_a_file_store_or_a_file_as_storage_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tiny("t")))
    (tmp_path / "afile").write_text("not a folder")
    # MLflow's file store takes no new runs (maintenance mode): said in one line, not MLflow's paragraph
    _one_line_error(_cli(TPP_STUDY, "run", "t.yaml", "--storage", "studies", "--tracking-uri",
                         f"file://{tmp_path}/mlruns", cwd=tmp_path), "file store is in maintenance mode")
    # allowed, but its folder cannot be made (a file in the way: what read-only media does too)
    proc = subprocess.run([TPP_STUDY, "run", "t.yaml", "--storage", "studies", "--tracking-uri",
                           f"file://{tmp_path}/afile/mlruns"], cwd=tmp_path, capture_output=True, text=True,
                          env={**_env(), "MLFLOW_ALLOW_FILE_STORE": "true"}, timeout=300)
    _one_line_error(proc, f"{tmp_path}/afile is not a folder")
    # a file given as the storage folder
    _one_line_error(_cli(TPP_STUDY, "run", "t.yaml", "--storage", "afile", cwd=tmp_path),
                    "storage: cannot write the study folder")
    for command in (["status", "t"], ["resume", "t"], ["list"]):
        proc = _cli(TPP_STUDY, *command, "--storage", "afile", cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "studies").exists() and (tmp_path / "afile").read_text() == "not a folder"


def _create_store(uri: str, start: float) -> str:
    from study.tracking import client

    time.sleep(max(start - time.time(), 0))
    try:
        client(uri, create=True).search_experiments()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"
    return "ok"


def test_two_processes_creating_one_new_store_at_once_both_succeed(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    for i in range(3):
        uri = f"sqlite:///{tmp_path / f'new{i}.db'}"
        with ctx.Pool(2) as pool:
            start = time.time() + 4  # both processes have imported MLflow by then
            results = pool.starmap(_create_store, [(uri, start), (uri, start)])
        assert results == ["ok", "ok"], results


def test_ctrl_c_while_the_dense_model_trains_is_one_line_with_the_resume_command(tmp_path):
    cfg = tiny("ctrlc", dense={"epochs": 400, "lr": 0.05, "batch_size": 16},
               data={"name": "synthetic", "kwargs": {"n_train": 2048, "n_test": 128}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([TPP_STUDY, "run", "c.yaml", "--storage", "studies"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 180
    while not any("dense epoch" in line for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines[-20:])
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(120) == 1, err
    assert "Traceback" not in err + "".join(lines), err[-3000:]
    assert len(err.strip().splitlines()) == 1 and "tpp-study resume" in err, err


def test_a_cluster_address_nobody_answers_is_one_line_within_seconds_and_leaves_nothing(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tiny("t")))
    address = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    proc = _cli(TPP_STUDY, "run", "t.yaml", "--storage", "studies", "--address", address, cwd=tmp_path,
                timeout=120)
    assert time.monotonic() - t0 < 30  # Ray alone retries such an address for minutes
    _one_line_error(proc, f"ray.address: nothing answers at {address}")
    assert not (tmp_path / "studies").exists()


def test_status_of_an_ended_study_reads_its_recorded_outcome_and_falls_back_when_it_may_be_stale(finished,
                                                                                                 tmp_path):
    """`status`, `list` and a resume with nothing to do read the outcome the study run recorded at its
    end (one read at any size) -- equal to the count over every member run -- and count the member runs
    again whenever the record may be stale: the study run not ended, or the planned runs changed."""
    import json

    from mlflow import MlflowClient

    from study.record import collect
    from study.schema import TAG_OUTCOME
    from study.store import StudyFolder

    folder = StudyFolder(_copy(finished, tmp_path) / "ok")
    full, quick = collect(folder), collect(folder, recorded=True)
    assert (quick.status, quick.counts, quick.reuse, quick.best) == (full.status, full.counts, full.reuse,
                                                                     full.best)
    assert full.runs and not quick.runs  # the quick one did not read the member runs
    meta = folder.read_meta()
    c = MlflowClient(meta.tracking_uri)
    record = c.get_run(meta.parent_run_id).data.tags[TAG_OUTCOME]
    c.set_tag(meta.parent_run_id, TAG_OUTCOME, json.dumps({**json.loads(record), "counts": {"completed": 1}}))
    assert collect(folder, recorded=True).counts == {"completed": 1}  # the record is what it read
    folder.update_meta(num_runs=meta.num_runs + 1)  # e.g. an extension: the record predates it
    assert collect(folder, recorded=True).counts == full.counts
    folder.update_meta(num_runs=meta.num_runs)
    c.update_run(meta.parent_run_id, status="RUNNING")  # a process that never ended it
    assert collect(folder, recorded=True).counts == full.counts
    c.update_run(meta.parent_run_id, status="FINISHED")
    c.set_tag(meta.parent_run_id, TAG_OUTCOME, record)
    proc = _cli(TPP_STUDY, "resume", "ok", "--storage", str(folder.path.parent), cwd=tmp_path)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stdout + proc.stderr

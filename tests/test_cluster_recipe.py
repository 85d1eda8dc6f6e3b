"""The README's cluster recipe, its commands as written: a head from `ray start --head`, a real `mlflow
server` on 127.0.0.1, then `tpp-study run CONFIG --address auto --storage ... --tracking-uri http://...`.

Loopback only, as every test here: the head starts with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (conftest),
which binds it to 127.0.0.1. A second node's `ray start --address HEAD:PORT` is refused with that variable
set, and without it Ray registers every node under the host's network address (STACK.md) -- traffic off
loopback; so the two-node variant runs only where TPP_TEST_HOST_NETWORK=1 says that is allowed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_study_run import free_port, start_mlflow_server, stop_mlflow_server, tiny

from study.record import collect
from study.store import StudyFolder

BIN = Path(sys.executable).parent
HOST_NETWORK = os.environ.get("TPP_TEST_HOST_NETWORK") == "1"


def _env(loopback: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if not loopback:
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


@contextlib.contextmanager
def _ray_node(args: list[str], env: dict[str, str]):
    """`ray start ARGS --block` in its own process group, up once it says so; stopped after."""
    proc = subprocess.Popen([str(BIN / "ray"), "start", *args, "--num-cpus", "1", "--block"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 120
        while not any("Ray runtime started" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-30:])
            time.sleep(0.3)
        yield
    finally:  # Ctrl-C: `ray start --block` stops its node in ~1 s (SIGTERM: not within 30 s). A shell's
        # background job inherits SIGINT ignored: then the whole group is killed after a few seconds
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print('NODES', sum(n['Alive'] for n in ray.nodes()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(out.stdout.split("NODES")[-1]) if "NODES" in out.stdout else -1


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, pytest.param(2, marks=pytest.mark.skipif(
    not HOST_NETWORK, reason="a second node talks over the host's address: TPP_TEST_HOST_NETWORK=1"))])
def test_the_readmes_cluster_recipe_runs_as_written(tmp_path, nodes):
    loopback = nodes == 1
    env = _env(loopback)
    port = free_port()
    head = f"127.0.0.1:{port}"
    current = Path("/tmp/ray/ray_current_cluster")  # what `--address auto` reads, as `ray start` leaves it
    before = current.read_text() if current.is_file() else None
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny("cluster", methods=["l1"], finetune__lr=[1e-2, 3e-2])))
    with contextlib.ExitStack() as stack:
        stack.enter_context(_ray_node(["--head", "--port", str(port), "--include-dashboard=false"], env))
        if nodes == 2:
            stack.enter_context(_ray_node(["--address", head], env))
            assert _alive_nodes("auto", env) == 2
        uri, server = start_mlflow_server(db, free_port())
        stack.callback(stop_mlflow_server, server)
        proc = subprocess.run([str(BIN / "tpp-study"), "run", str(cfg), "--address", "auto", "--storage",
                               str(tmp_path / "studies"), "--tracking-uri", uri], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        res = collect(StudyFolder(tmp_path / "studies" / "cluster"))
        assert res.status == "completed" and res.num_runs == 4 and not res.counts.get("failed")
        assert res.tracking_uri == uri  # every run went to the server
        assert _alive_nodes(head, env) == nodes  # the study joined the cluster and left it running
    if before is not None:  # `ray start` rewrote it: leave other Ray users what they had
        current.write_text(before)
    else:
        current.unlink(missing_ok=True)

"""Two local processes (4 fake CPU devices each, gloo collectives) against one 8-device process.

The children run `tests/multihost_worker.py` in their own process groups under a hard
deadline; every child is killed (SIGKILL to its group) on timeout, failure or success, so the
test cannot hang.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import multihost_worker
import numpy as np
import pytest
from xla_flags import flags_with_devices

from moe_jax import multihost, parallel
from tests.tolerances import summed_atol

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
REPO_ROOT = os.path.dirname(os.path.dirname(WORKER))
NUM_PROCESSES = 2
DEADLINE_S = 60


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = flags_with_devices(4)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    return env


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _run_two_processes(out_dir: str) -> list[tuple[int, str]]:
    """Start both workers, wait for them under the deadline, kill what is left; (rc, log)."""
    port = _free_port()
    env = _child_env()
    logs = [open(os.path.join(out_dir, f"process_{i}.log"), "w+") for i in range(NUM_PROCESSES)]
    processes = []
    try:
        for process_id in range(NUM_PROCESSES):
            command = [sys.executable, WORKER, str(process_id), str(NUM_PROCESSES), str(port)]
            processes.append(
                subprocess.Popen(
                    [*command, out_dir],
                    env=env,
                    cwd=REPO_ROOT,
                    stdout=logs[process_id],
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, killed as a whole
                )
            )
        deadline = time.monotonic() + DEADLINE_S
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
            if process.returncode != 0:
                break  # the other one would wait for it in a collective
    finally:
        for process in processes:
            _kill(process)
    results = []
    for process, log in zip(processes, logs):
        log.seek(0)
        results.append((process.returncode, log.read()[-4000:]))
        log.close()
    return results


def test_two_processes_match_one_process(tmp_path):
    started = time.monotonic()
    results = _run_two_processes(str(tmp_path))
    elapsed = time.monotonic() - started
    for process_id, (returncode, log) in enumerate(results):
        assert returncode == 0, f"process {process_id} exited with {returncode}:\n{log}"
    assert elapsed < DEADLINE_S
    two_processes = dict(np.load(tmp_path / "result.npz"))
    assert int(two_processes.pop("process_count")) == 2
    assert int(two_processes.pop("device_count")) == 8
    assert int(two_processes.pop("agreed_step")) == 10  # process 0 proposed 10, process 1 11

    one_process = multihost_worker.compute()
    assert sorted(one_process) == sorted(two_processes)
    for key, expected in one_process.items():
        # a weight's gradient sums the BATCH * LENGTH tokens' terms
        atol = summed_atol(expected, multihost_worker.BATCH * multihost_worker.LENGTH)
        np.testing.assert_allclose(two_processes[key], expected, rtol=1e-5, atol=atol, err_msg=key)
    assert np.any(one_process["grad/wi"]) and np.any(one_process["grad/router/kernel"])
    # only process 0 logs
    assert "logged by process 0 of 2" in results[0][1]
    assert "logged by process" not in results[1][1]


def test_global_batch_rejects_uneven_batch():
    config = multihost_worker.layer_config()
    mesh = parallel.mesh_from_config(config)
    with pytest.raises(ValueError, match="batch size 6 does not divide by 8"):
        multihost.global_batch(np.zeros((6, 4), np.float32), mesh, config)

"""A real sweep of 2 tiny runs (experiments/sweep.py): interrupted after its first finished run,
resumed without redoing finished runs, then results.csv and the plots (experiments/plot.py).

Runs are tiny (d_model 32, 2 layers, 4 experts, batch 8 x 32 tokens, 6 steps); the sweep and its
trainers are subprocesses, so that the test can signal the sweep as a user's Ctrl-C would.
"""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny_training import TINY_TRAINING
from xla_flags import flags_with_devices

from experiments import plot, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 6
SETTINGS = {
    **TINY_TRAINING,
    "train.num_steps": NUM_STEPS,
    "train.eval_every": 3,
    "train.eval_steps": 1,
    "train.checkpoint_every": 2,
}
# two runs are the fewest that leave one to resume; test_sweep_grid covers grids of several axes
AXES = ("moe.capacity_factor_train=1.0,2.0",)
RUN_NAMES = ["moe.capacity_factor_train-1.0", "moe.capacity_factor_train-2.0"]
TIMEOUT = 400  # seconds for the whole sweep; a hang fails the test instead of blocking CI


def sweep_command(sweep_dir):
    command = [sys.executable, "-m", "experiments.sweep", "--config=configs/switch.py:tiny"]
    command += [f"--sweep_dir={sweep_dir}", "--parallel=1"]
    command += [f"--sweep={axis}" for axis in AXES]
    return command + [f"--set={key}={value}" for key, value in SETTINGS.items()]


def sweep_env(tmp_path):
    """One CPU device for the trainers, and a compilation cache shared by them."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = flags_with_devices(None)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    return env


def done_runs(sweep_dir):
    return [name for name in RUN_NAMES if (sweep_dir / name / sweep.DONE_FILE).exists()]


def test_sweep_is_interrupted_resumed_and_plotted(tmp_path):
    sweep_dir = tmp_path / "sweep"
    env = sweep_env(tmp_path)
    deadline = time.monotonic() + TIMEOUT

    first = subprocess.Popen(
        sweep_command(sweep_dir), cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        while not done_runs(sweep_dir):
            assert first.poll() is None, "the sweep ended before any run finished"
            assert time.monotonic() < deadline, "no run finished in time"
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)  # as Ctrl-C: the sweep stops its trainer and exits
        output, _ = first.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, output
    assert "stopped" in output, output
    finished = done_runs(sweep_dir)
    assert 1 <= len(finished) < len(RUN_NAMES), output
    assert (sweep_dir / sweep.RESULTS_FILE).exists()
    before = {
        name: (
            (sweep_dir / name / sweep.DONE_FILE).read_text(),
            (sweep_dir / name / sweep.DONE_FILE).stat().st_mtime_ns,
            (sweep_dir / name / "train.log").stat().st_size,
            (sweep_dir / name / "metrics.jsonl").read_text(),
        )
        for name in finished
    }

    second = subprocess.run(
        sweep_command(sweep_dir),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=max(1.0, deadline - time.monotonic()),
    )
    assert second.returncode == 0, second.stdout + second.stderr
    skipped = len(finished)
    assert f"2 runs, {skipped} already done, {2 - skipped} to run" in second.stdout
    for name in finished:  # neither restarted nor touched
        assert f"start {name}:" not in second.stdout
        after = (
            (sweep_dir / name / sweep.DONE_FILE).read_text(),
            (sweep_dir / name / sweep.DONE_FILE).stat().st_mtime_ns,
            (sweep_dir / name / "train.log").stat().st_size,
            (sweep_dir / name / "metrics.jsonl").read_text(),
        )
        assert after == before[name]
    assert done_runs(sweep_dir) == RUN_NAMES

    with (sweep_dir / sweep.RESULTS_FILE).open() as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == sorted(RUN_NAMES)
    for name, row in rows.items():
        assert row["status"] == "finished"
        assert float(row["final_step"]) == NUM_STEPS
        assert float(row["final_eval_cross_entropy"]) > 0.0
        train_steps = [
            record["step"]
            for record in sweep.read_metrics(sweep_dir / name)
            if record["split"] == "train"
        ]
        assert train_steps == list(range(1, NUM_STEPS + 1)), name  # resumed, no gap or repeat

    written = {path.name for path in plot.make_plots(sweep_dir)}
    expected = {"loss_curves.png", "dropped_vs_capacity.png", "router_logits.png"}
    expected |= {"final_eval.png"} | {f"expert_load_{name}.png" for name in RUN_NAMES}
    assert expected <= written
    for name in expected:
        assert (sweep_dir / name).stat().st_size > 1000


def test_misspelt_key_is_refused_before_any_run(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    config = os.path.join(ROOT, "configs", "switch.py") + ":tiny"
    for bad in (["--sweep=moe.num_expertz=2,4"], ["--sweep=moe.k=1,2", "--set=train.num_stepz=3"]):
        with pytest.raises(SystemExit) as error:
            sweep.main([f"--config={config}", f"--sweep_dir={sweep_dir}", *bad])
        assert error.value.code == 2
        message = capsys.readouterr().err
        assert "the config has no key" in message and "did you mean --config." in message
        assert not sweep_dir.exists()

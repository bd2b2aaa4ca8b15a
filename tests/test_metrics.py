"""The metrics writer's JSON lines and TensorBoard files, and resumed-run truncation."""

import json
import os
import subprocess
import sys

import numpy as np

from moe_jax.metrics import (
    METRICS_FILE,
    TENSORBOARD_DIR,
    MetricsWriter,
    Progress,
    truncate_metrics,
    weighted_means,
    window_mean,
)


def test_weighted_means_weigh_each_batch_by_its_tokens_by_hand():
    # (1.0 * 3 + 2.0 * 1) / 4 = 1.25; per-expert vectors average elementwise the same way
    results = [
        {"cross_entropy": np.float32(1.0), "load": np.array([0.5, 0.5]), "weight_sum": 3.0},
        {"cross_entropy": np.float32(2.0), "load": np.array([1.0, 0.0]), "weight_sum": 1.0},
    ]
    means = weighted_means(results)
    assert set(means) == {"cross_entropy", "load"} and means["cross_entropy"] == 1.25
    np.testing.assert_allclose(means["load"], [0.625, 0.375])
    # batches without a real token (all padding) divide by 1, not by 0
    assert weighted_means([{"cross_entropy": 0.0, "weight_sum": 0.0}])["cross_entropy"] == 0.0


def _read(workdir):
    with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def test_writes_json_lines_and_event_files(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    load = np.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]], np.float32)
    writer.write(10, "train", {"loss": np.float32(2.5), "expert_load": load})
    writer.write(10, "eval", {"loss": float("nan")})
    writer.close()
    records = _read(tmp_path)
    assert records[0] == {
        "step": 10,
        "split": "train",
        "loss": 2.5,
        "expert_load": [[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]],
    }
    assert records[1] == {"step": 10, "split": "eval", "loss": "nan"}
    event_files = os.listdir(os.path.join(tmp_path, TENSORBOARD_DIR))
    assert any(name.startswith("events.out.tfevents") for name in event_files)


def test_writer_does_not_import_pytorch_and_pytorch_still_imports(tmp_path):
    # tensorboardX imports torch whenever it is installed, seconds per training process.
    script = (
        "import sys\n"
        "from moe_jax.metrics import MetricsWriter\n"
        f"MetricsWriter({str(tmp_path)!r}).close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import torch\n"
        "print(torch.ones(2).sum().item())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "2.0"


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path), enabled=False)
    writer.write(1, "train", {"loss": 1.0})
    writer.close()
    assert os.listdir(tmp_path) == []


def test_truncate_drops_steps_after_the_checkpoint(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in (5, 10, 15):
        writer.write(step, "train", {"loss": float(step)})
    writer.close()
    truncate_metrics(str(tmp_path), 10)
    assert [record["step"] for record in _read(tmp_path)] == [5, 10]


def test_progress_logs_plain_lines_off_a_terminal(capsys):
    progress = Progress(start_step=0, num_steps=4)
    progress.update(2, {"loss": 1.5})
    progress.close()
    assert "step 2/4  loss=1.5" in capsys.readouterr().err


def test_window_mean_by_hand():
    # Two steps: means of the losses (1, 3) -> 2 and of the loads -> [[0.5, 0.5]]; the learning
    # rate and parameter norm are the last step's, the largest router logit the larger one.
    window = [
        {
            "loss": 1.0,
            "expert_load": [[1.0, 0.0]],
            "learning_rate": 0.1,
            "param_norm": 5.0,
            "router_logit_max": 7.0,
        },
        {
            "loss": 3.0,
            "expert_load": [[0.0, 1.0]],
            "learning_rate": 0.2,
            "param_norm": 6.0,
            "router_logit_max": 4.0,
        },
    ]
    values = window_mean(window)
    assert values["loss"] == 2.0
    np.testing.assert_array_equal(values["expert_load"], [[0.5, 0.5]])
    assert (values["learning_rate"], values["param_norm"]) == (0.2, 6.0)
    assert values["router_logit_max"] == 7.0


def test_progress_shows_evaluations(capsys):
    progress = Progress(start_step=0, num_steps=4)
    progress.show_eval(4, {"loss": 2.5, "cross_entropy": 2.25, "accuracy": 0.5, "eval_batches": 4})
    progress.close()
    assert "eval at step 4: loss=2.5000  cross_entropy=2.2500  accuracy=0.5000" in (
        capsys.readouterr().err
    )

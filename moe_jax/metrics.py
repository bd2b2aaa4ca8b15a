"""Where training metrics go: `metrics.jsonl`, TensorBoard event files and the progress display.

Training metrics are logged every `train.log_every` steps as the window's means (`window_mean`).
`MetricsWriter` writes one JSON object per logged step and split to `WORKDIR/metrics.jsonl`
(`{"step": 10, "split": "train", "loss": 5.1, "expert_load": [[...], ...], ...}`) and the same
values to TensorBoard event files under `WORKDIR/tensorboard/` (scalars as `split/name`; each
sparse layer's per-expert load as a histogram and as its max/mean imbalance). Only process 0
writes; other processes get a writer that does nothing.

`Progress` shows a tqdm bar with the loss and tokens/s when stderr is a terminal and plain log
lines otherwise (CI logs, `nohup`, notebooks' captured output), and a line per evaluation.
(clu's metric writers write TensorBoard files through TensorFlow or PyTorch and have no JSON-lines
writer, so the writer here uses tensorboardX.)
"""

import json
import math
import os
import sys
import time

import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _to_json(value):
    """Python floats/ints/lists for a metric value (a scalar or an array)."""
    array = np.asarray(value)
    if array.ndim == 0:
        scalar = array.item()
        if isinstance(scalar, float) and not math.isfinite(scalar):
            return str(scalar)  # 'nan' / 'inf': JSON has no literal for them
        return scalar
    return array.tolist()


# logged as the window's last value (a state, not a per-step measurement) or its largest
LAST_IN_WINDOW = ("learning_rate", "param_norm")
MAX_IN_WINDOW = ("router_logit_max",)


def window_mean(window: list[dict]) -> dict:
    """The logged values of a window of steps' metrics (host arrays): the mean over the steps,
    except `LAST_IN_WINDOW` (the last step's) and `MAX_IN_WINDOW` (the largest)."""
    values = {}
    for name in window[-1]:
        stacked = np.stack([np.asarray(step[name], np.float64) for step in window])
        if name in LAST_IN_WINDOW:
            values[name] = stacked[-1]
        elif name in MAX_IN_WINDOW:
            values[name] = stacked.max(axis=0)
        else:
            values[name] = stacked.mean(axis=0)
    return values


def weighted_means(results: list[dict]) -> dict:
    """Token-weighted means of per-batch metrics (host values; each batch weighs its
    `weight_sum`): `sum_b value_b * weight_b / max(sum_b weight_b, 1)` in float64, without
    `weight_sum` itself."""
    weights = [float(result["weight_sum"]) for result in results]
    total = max(sum(weights), 1.0)
    return {
        key: sum(
            np.asarray(result[key], np.float64) * weight for result, weight in zip(results, weights)
        )
        / total
        for key in results[0]
        if key != "weight_sum"
    }


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Drops lines logged after `last_step` (a resumed run logs those steps again)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as file:
        lines = [line for line in file if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w", encoding="utf-8") as file:
            file.writelines(kept)
        os.replace(path + ".tmp", path)


def _summary_writer_class():
    """tensorboardX's `SummaryWriter`, imported without importing PyTorch.

    tensorboardX's writer module imports torch whenever it is installed (3.4 s on this 2-core
    host, in every training process) only to accept torch tensors, which nothing here passes; a
    `None` entry in `sys.modules` makes that import fail for the moment tensorboardX is imported.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends metrics to `metrics.jsonl` and TensorBoard; a no-op unless `enabled`."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self._enabled = enabled
        if not enabled:
            return
        self._file = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
        self._tensorboard = _summary_writer_class()(os.path.join(workdir, TENSORBOARD_DIR))

    def write(self, step: int, split: str, values: dict) -> None:
        """Logs `values` (scalars; `expert_load` may be `f32[num_sparse_layers, E]`) at `step`."""
        if not self._enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({name: _to_json(value) for name, value in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            array = np.asarray(value, dtype=np.float64)
            if array.ndim == 0:
                self._tensorboard.add_scalar(f"{split}/{name}", float(array), step)
                continue
            for layer, layer_values in enumerate(array.reshape(array.shape[0], -1)):
                tag = f"{split}/{name}/layer_{layer}"
                self._tensorboard.add_histogram(tag, layer_values, step)
                imbalance = layer_values.max() / max(layer_values.mean(), 1e-12)
                self._tensorboard.add_scalar(f"{tag}/max_over_mean", imbalance, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._enabled:
            self._file.close()
            self._tensorboard.close()


class Progress:
    """A tqdm bar on a terminal, log lines elsewhere; `update` is called once per step."""

    def __init__(self, *, start_step: int, num_steps: int, enabled: bool = True):
        self._enabled = enabled
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm.tqdm(
                total=num_steps, initial=start_step, unit="step", dynamic_ncols=True
            )
        self._num_steps = num_steps
        self._start_time = time.time()

    def update(self, step: int, values: dict | None = None) -> None:
        """Advances to `step`; `values` (e.g. loss, tokens/s) are shown when given."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if values:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        elif values:
            shown = "  ".join(f"{k}={v:.4g}" for k, v in values.items())
            elapsed = time.time() - self._start_time
            print(
                f"step {step}/{self._num_steps}  {shown}  ({elapsed:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    def show_eval(self, step: int, values: dict) -> None:
        """A line with the evaluation's loss, cross-entropy and accuracy at `step`."""
        if not self._enabled:
            return
        shown = "  ".join(
            f"{key}={float(values[key]):.4f}"
            for key in ("loss", "cross_entropy", "accuracy")
            if key in values
        )
        line = f"eval at step {step}: {shown}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

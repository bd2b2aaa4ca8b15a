"""Figures for a sweep directory (or one run's workdir), written as PNG files beside the results.

    python -m experiments.plot runs/experts            # every run under a sweep directory
    python -m experiments.plot runs/switch_tiny        # a single training workdir

Figures: `loss_curves.png` (train and eval cross-entropy against step: the auxiliary losses
are left out so that runs with different auxiliary losses compare), `expert_load_<run>.png`
(per-layer heatmap over training of each expert's share of the filled slots, i.e. of the tokens
it processed after capacity drops; a name past 255 bytes is cut short and ended by a hash),
`dropped_vs_capacity.png` (fraction of dropped tokens against the capacity factor, when the
sweep varies `moe.capacity_factor_train`), `router_logits.png` (largest router logit, when the
metrics have it, and router z-loss over training) and `final_eval.png` (each run's final eval
cross-entropy, from results.csv). When the sweep has a seed axis (`results_seeds.csv`),
`final_eval.png` shows each configuration's mean with a +-1 standard deviation error bar and its
seeds as dots, and `loss_curves_seeds.png` the mean eval cross-entropy of each configuration
against step and against training seconds (from the logged tokens/s), +-1 std error bars.
With `--baseline KEY=VALUE[,...]` (as for `experiments.sweep`), `paired_deltas.png` shows each
configuration's eval cross-entropy minus the baseline's at the same seed and step, against step:
the mean over seeds with +-1 std error bars. When the sweep ran with `--ceiling`
(`results_seeds.csv` has `gap_recovered_mean`), `gap_recovered.png` shows each configuration's
share of the baseline-to-ceiling gap it closes, mean +-1 std over its seeds, labelled by the
settings where it departs from most configurations (a study of one change at a time).
"""

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from experiments.routing_report import layer_name
from experiments.sweep import (
    RESULTS_FILE,
    SEED_KEY,
    SEED_RESULTS_FILE,
    fit_file_name,
    matches,
    parse_baseline,
    read_metrics,
)
from moe_jax import score, train

CAPACITY_KEY = "moe.capacity_factor_train"


def find_runs(directory: Path) -> dict[str, list[dict]]:
    """Run name -> metric records, for a workdir or every workdir below a sweep directory."""
    if (directory / "metrics.jsonl").exists():
        return {directory.name: read_metrics(directory)}
    return {
        path.parent.name: read_metrics(path.parent)
        for path in sorted(directory.glob("*/metrics.jsonl"))
    }


def series(records: list[dict], split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of `key` over the records of one split that have it."""
    points = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps), np.asarray(values, dtype=np.float64)


def plot_loss_curves(runs: dict[str, list[dict]], out_dir: Path) -> Path:
    figure, (train_axis, eval_axis) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, records in runs.items():
        train_axis.plot(*series(records, "train", "cross_entropy"), label=name)
        eval_axis.plot(*series(records, "eval", "cross_entropy"), marker="o", label=name)
    for axis, title in ((train_axis, "train cross-entropy"), (eval_axis, "eval cross-entropy")):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    train_axis.set_ylabel("cross-entropy (nats/token)")
    eval_axis.legend(fontsize=7)
    return save(figure, out_dir / "loss_curves.png")


def sparse_layer_names(run_dir: Path) -> list[str] | None:
    """The names of the run's sparse layers, bottom to top, encoder first (`expert_load`'s rows),
    as the routing report gives them ('decoder layer 1'); None for a run without config.json."""
    try:
        config = train.config_from_workdir(str(run_dir))
    except (FileNotFoundError, ValueError):
        return None
    return [layer_name(stack, layer) for stack, layer in score.sparse_layers(config)]


def plot_expert_load(
    name: str, records: list[dict], out_dir: Path, layer_names: list[str] | None = None
) -> Path | None:
    """Heatmaps of `expert_load` (f32[layers, E] per record: each expert's share of the filled
    slots) with x step, y expert, one panel per sparse layer, labelled by `layer_names`
    (`sparse_layer_names`; without them 'sparse layer i', counting from 0)."""
    train_records = [r for r in records if r.get("split") == "train" and "expert_load" in r]
    if not train_records:
        return None
    steps = [r["step"] for r in train_records]
    load = np.asarray([r["expert_load"] for r in train_records], dtype=np.float64)  # [S, layers, E]
    num_layers, num_experts = load.shape[1], load.shape[2]
    if layer_names is None or len(layer_names) != num_layers:
        layer_names = [f"sparse layer {layer}" for layer in range(num_layers)]
    figure, axes = plt.subplots(
        num_layers, 1, figsize=(10, 1.2 + 1.6 * num_layers), squeeze=False, sharex=True
    )
    for layer, axis in enumerate(axes[:, 0]):
        image = axis.imshow(
            load[:, layer, :].T,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            vmin=0.0,
            extent=(steps[0], steps[-1], -0.5, num_experts - 0.5),
        )
        axis.set_ylabel(f"{layer_names[layer]}\nexpert")
        figure.colorbar(image, ax=axis, label="load")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(
        f"{name}: share of the filled expert slots (after capacity; uniform = 1/E)"
    )
    return save(figure, out_dir / fit_file_name(f"expert_load_{name}", ".png"))


def plot_dropped_vs_capacity(sweep_dir: Path) -> Path | None:
    """Final dropped fraction against the capacity factor, one line per other swept setting."""
    path = sweep_dir / RESULTS_FILE
    if not path.exists():
        return None
    with path.open() as f:
        rows = [row for row in csv.DictReader(f) if row.get(CAPACITY_KEY)]
    rows = [row for row in rows if row.get("final_fraction_dropped")]
    if not rows:
        return None
    swept = [key for key in varying_settings(rows) if key != CAPACITY_KEY]
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        label = ", ".join(f"{key}={row[key]}" for key in swept) or "runs"
        point = (float(row[CAPACITY_KEY]), float(row["final_fraction_dropped"]))
        lines.setdefault(label, []).append(point)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for label, points in lines.items():
        capacity, dropped = zip(*sorted(points))
        axis.plot(capacity, dropped, marker="o", label=label)
    axis.set_xlabel("train capacity factor")
    axis.set_ylabel("fraction of tokens dropped (final train step)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return save(figure, sweep_dir / "dropped_vs_capacity.png")


def varying_settings(rows: list[dict]) -> list[str]:
    """The config keys (dotted columns of results.csv) whose value differs between rows."""
    keys = [key for key in rows[0] if "." in key]
    return [key for key in keys if len({row.get(key) for row in rows}) > 1]


def plot_router_logits(runs: dict[str, list[dict]], out_dir: Path) -> Path | None:
    """Largest router logit (if logged) and router z-loss (mean logsumexp^2) over training."""
    has = {
        key: any(series(records, "train", key)[0].size for records in runs.values())
        for key in ("router_logit_max", "z_loss")
    }
    keys = [key for key, present in has.items() if present]
    if not keys:
        return None
    titles = {
        "router_logit_max": "largest router logit",
        "z_loss": "router z-loss = mean logsumexp(logits)^2, summed over sparse layers",
    }
    figure, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for name, records in runs.items():
            axis.plot(*series(records, "train", key), label=name)
        axis.set_title(titles[key], fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if key == "z_loss":
            axis.set_yscale("log")
    axes[0, -1].legend(fontsize=7)
    return save(figure, out_dir / "router_logits.png")


def plot_final_eval(sweep_dir: Path) -> Path | None:
    """Final eval cross-entropy of each run of a sweep (results.csv), as bars."""
    path = sweep_dir / RESULTS_FILE
    if not path.exists():
        return None
    with path.open() as f:
        rows = [row for row in csv.DictReader(f) if row.get("final_eval_cross_entropy")]
    if not rows:
        return None
    swept = varying_settings(rows)
    labels = [", ".join(row[key] for key in swept) or row["run"] for row in rows]
    values = [float(row["final_eval_cross_entropy"]) for row in rows]
    figure, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(rows)), 4.5))
    axis.bar(range(len(rows)), values, color="tab:blue")
    for index, value in enumerate(values):
        axis.text(index, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    axis.set_ylim(min(values) - 0.1, max(values) + 0.05)
    axis.set_ylabel("final eval cross-entropy (nats/token)")
    axis.set_title(", ".join(swept) or "runs", fontsize=9)
    axis.grid(alpha=0.3, axis="y")
    return save(figure, sweep_dir / "final_eval.png")


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def plot_final_eval_seeds(sweep_dir: Path) -> Path | None:
    """Mean final eval cross-entropy per configuration (results_seeds.csv), +-1 std error bars,
    each seed's value (results.csv) as a dot."""
    path = sweep_dir / SEED_RESULTS_FILE
    if not path.exists():
        return None
    configs = [row for row in read_csv(path) if row.get("final_eval_cross_entropy_mean")]
    if not configs:
        return None
    runs = read_csv(sweep_dir / RESULTS_FILE)
    swept = varying_settings(configs) if len(configs) > 1 else []
    labels = [", ".join(row[key] for key in swept) or "runs" for row in configs]
    means = [float(row["final_eval_cross_entropy_mean"]) for row in configs]
    stds = [float(row["final_eval_cross_entropy_std"] or 0.0) for row in configs]
    figure, axis = plt.subplots(figsize=(max(7.0, 1.3 * len(configs)), 4.5))
    axis.bar(range(len(configs)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.6)
    for index, config in enumerate(configs):
        seeds = [
            float(run["final_eval_cross_entropy"])
            for run in runs
            if run.get("status") == "finished"
            and run.get("final_eval_cross_entropy")
            and all(run.get(key) == config[key] for key in config if "." in key)
        ]
        axis.plot([index] * len(seeds), seeds, "k.", markersize=5)
        axis.text(
            index,
            means[index] + stds[index],
            f"{means[index]:.3f}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axis.set_xticks(range(len(configs)), labels, rotation=30, ha="right", fontsize=8)
    axis.set_ylim(min(means) - max(stds) - 0.1, max(means) + max(stds) + 0.05)
    axis.set_ylabel("final eval cross-entropy (nats/token)")
    seed_counts = sorted({row["num_seeds"] for row in configs})
    axis.set_title(
        f"{', '.join(swept) or 'runs'}\nmean +- std over {'/'.join(seed_counts)} seeds (dots)",
        fontsize=8,
    )
    axis.grid(alpha=0.3, axis="y")
    return save(figure, sweep_dir / "final_eval.png")


def plot_gap_recovered(sweep_dir: Path) -> Path | None:
    """Each configuration's share of the gap recovered (results_seeds.csv, written by a sweep
    with --baseline and --ceiling), +-1 std error bars; None when the file has no such column."""
    path = sweep_dir / SEED_RESULTS_FILE
    configs = (
        [row for row in read_csv(path) if row.get("gap_recovered_mean")] if path.exists() else []
    )
    if len(configs) < 2:
        return None
    swept = varying_settings(configs)
    labels = [departures_label(row, configs, swept) for row in configs]
    shares = [float(row["gap_recovered_mean"]) for row in configs]
    stds = [float(row["gap_recovered_std"] or 0.0) for row in configs]
    figure, axis = plt.subplots(figsize=(max(7.0, 1.3 * len(configs)), 4.5))
    axis.barh(range(len(configs)), shares, xerr=stds, capsize=4, color="tab:green", alpha=0.6)
    for index, config in enumerate(configs):
        text = f"{shares[index]:.0%} ({config['gap_seeds'].count('/') + 1} seeds)"
        axis.text(shares[index] + stds[index] + 0.01, index, text, va="center", fontsize=8)
    axis.set_yticks(range(len(configs)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.axvline(0.0, color="k", linewidth=0.8)
    axis.axvline(1.0, color="k", linewidth=0.8, linestyle="--")
    axis.set_xlabel("share of the baseline-to-ceiling gap recovered (final eval cross-entropy)")
    axis.grid(alpha=0.3, axis="x")
    return save(figure, sweep_dir / "gap_recovered.png")


def plot_loss_curves_seeds(sweep_dir: Path, runs: dict[str, list[dict]]) -> Path | None:
    """Eval cross-entropy per configuration against step and wall-clock seconds: the mean over
    its seeds with +-1 std error bars (wall-clock: the mean seconds at each eval step)."""
    if not (sweep_dir / SEED_RESULTS_FILE).exists():
        return None
    groups: dict[str, list[dict]] = {}
    rows = read_csv(sweep_dir / RESULTS_FILE)
    keys = varying_settings(rows)
    for row in rows:
        if row.get("status") == "finished" and row["run"] in runs:
            label = settings_label(row, keys)
            train = json.loads((sweep_dir / row["run"] / "config.json").read_text())["train"]
            curve = eval_points(runs[row["run"]], train["batch_size"] * train["seq_len"])
            groups.setdefault(label, []).append(curve)
    if not groups:
        return None
    figure, (step_axis, time_axis) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for label, curves in groups.items():
        steps = sorted(set.intersection(*(set(curve) for curve in curves)))
        if not steps:
            continue
        values = np.asarray([[curve[step][0] for step in steps] for curve in curves])  # [S, P]
        seconds = np.asarray([[curve[step][1] for step in steps] for curve in curves])  # [S, P]
        std = values.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
        legend = f"{label} ({len(curves)} seeds)"
        step_axis.errorbar(steps, values.mean(0), yerr=std, marker="o", capsize=3, label=legend)
        time_axis.errorbar(seconds.mean(0), values.mean(0), yerr=std, marker="o", capsize=3)
    step_axis.set_xlabel("step")
    time_axis.set_xlabel("training seconds (logged tokens/s; mean over seeds)")
    step_axis.set_ylabel("eval cross-entropy (nats/token), mean +- std over seeds")
    for axis in (step_axis, time_axis):
        axis.grid(alpha=0.3)
    step_axis.legend(fontsize=6)
    return save(figure, sweep_dir / "loss_curves_seeds.png")


def settings_label(row: dict, keys: list[str]) -> str:
    """'moe.k=2, moe.num_experts=8': the settings `keys` of a results.csv row."""
    return ", ".join(f"{key}={row[key]}" for key in keys) or "runs"


def departures_label(row: dict, rows: list[dict], keys: list[str]) -> str:
    """The settings `keys` where `row` departs from the value most of `rows` share (the first
    of the most common ones on a tie): a sweep of one change at a time reads as its changes."""
    common = {}
    for key in keys:
        values = [other[key] for other in rows]
        common[key] = max(values, key=values.count)
    departures = [key for key in keys if row[key] != common[key]]
    return settings_label(row, departures) if departures else "the common settings"


def paired_delta_curves(
    sweep_dir: Path, runs: dict[str, list[dict]], baseline: dict[str, str]
) -> dict[str, tuple[list[int], np.ndarray, np.ndarray, int]]:
    """{label: (steps, mean, std, seeds)} of eval cross-entropy minus the baseline's.

    For each configuration other than the baseline (the finished runs matching every
    `baseline` setting), the difference at every eval step that it and the baseline run of the
    same seed both have; mean and sample std (0 for one seed) over the seeds both finished.
    """
    reference: dict[str, dict[int, float]] = {}
    curves: dict[str, dict[str, dict[int, float]]] = {}
    rows = read_csv(sweep_dir / RESULTS_FILE)
    keys = varying_settings(rows)
    for row in rows:
        if row.get("status") != "finished" or row["run"] not in runs:
            continue
        # eval_points' seconds are not used here, so any tokens-per-step will do
        points = {step: ce for step, (ce, _) in eval_points(runs[row["run"]], 1).items()}
        if matches(row, baseline):
            reference[row[SEED_KEY]] = points
        else:
            label = settings_label(row, keys)
            curves.setdefault(label, {})[row[SEED_KEY]] = points
    result = {}
    for label, by_seed in curves.items():
        seeds = [seed for seed in by_seed if seed in reference]
        if not seeds:
            continue
        steps = sorted(set.intersection(*(set(by_seed[s]) & set(reference[s]) for s in seeds)))
        deltas = np.asarray(
            [[by_seed[seed][step] - reference[seed][step] for step in steps] for seed in seeds]
        )  # [S, P]
        std = deltas.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(len(steps))
        result[label] = (steps, deltas.mean(axis=0), std, len(seeds))
    return result


def plot_paired_deltas(
    sweep_dir: Path, runs: dict[str, list[dict]], baseline: dict[str, str]
) -> Path | None:
    """`paired_delta_curves` against step, one line per configuration, 0 = the baseline."""
    curves = paired_delta_curves(sweep_dir, runs, baseline)
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for label, (steps, mean, std, seeds) in curves.items():
        axis.errorbar(
            steps, mean, yerr=std, marker="o", capsize=3, label=f"{label} ({seeds} seeds)"
        )
    axis.axhline(0.0, color="k", linewidth=0.8)
    axis.set_xlabel("step")
    names = ", ".join(f"{key}={value}" for key, value in baseline.items())
    axis.set_ylabel(f"eval CE minus {names} (same seed)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6)
    return save(figure, sweep_dir / "paired_deltas.png")


def eval_points(records: list[dict], tokens_per_step: int) -> dict[int, tuple[float, float]]:
    """{step: (eval cross-entropy, training seconds up to that step)} of one run.

    Training seconds add up each logged window's steps x `tokens_per_step` / its tokens/s: the
    time of the train steps (the first window includes compilation), not of evaluation.
    """
    seconds, previous, elapsed = {}, 0, 0.0
    for record in records:
        if record.get("split") == "train" and record.get("tokens_per_second"):
            elapsed += (record["step"] - previous) * tokens_per_step / record["tokens_per_second"]
            previous = record["step"]
            seconds[previous] = elapsed
    return {
        r["step"]: (r["cross_entropy"], seconds.get(r["step"], float("nan")))
        for r in records
        if r.get("split") == "eval" and "cross_entropy" in r
    }


def save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def make_plots(directory: Path, baseline: dict[str, str] | None = None) -> list[Path]:
    runs = find_runs(directory)
    if not runs:
        raise FileNotFoundError(
            f"no metrics.jsonl in {directory} or its subdirectories: point at a training "
            "workdir or a sweep directory"
        )
    written = [plot_loss_curves(runs, directory)]
    single_run = (directory / "metrics.jsonl").exists()
    for name, records in runs.items():
        names = sparse_layer_names(directory if single_run else directory / name)
        written.append(plot_expert_load(name, records, directory, names))
    written += [plot_dropped_vs_capacity(directory), plot_router_logits(runs, directory)]
    if (directory / SEED_RESULTS_FILE).exists():
        written += [plot_final_eval_seeds(directory), plot_loss_curves_seeds(directory, runs)]
        written.append(plot_gap_recovered(directory))
        if baseline:
            written.append(plot_paired_deltas(directory, runs, baseline))
    else:
        written.append(plot_final_eval(directory))
    return [path for path in written if path is not None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a sweep directory or a training workdir")
    parser.add_argument(
        "--baseline", default="", help="KEY=VALUE,...: plot deltas to this configuration by seed"
    )
    args = parser.parse_args(argv)
    try:
        baseline = parse_baseline(args.baseline)
    except ValueError as error:
        parser.error(str(error))
    for path in make_plots(args.directory, baseline):
        print(path)


if __name__ == "__main__":
    main()

"""Ablation sweeps: run `moe_jax.train` over a grid of config overrides and collect results.

    python -m experiments.sweep --config=configs/switch.py:tiny --sweep_dir=runs/experts \
        --sweep moe.num_experts=2,4,8,16 --sweep moe.k=1,2 --set train.num_steps=500 --parallel 2

Each `--sweep KEY=V1,V2,...` is one axis; the runs are their product (or, with `--zip`, the
axes taken side by side). Every KEY is checked against the config before any run starts (a
misspelt one is named, with close matches). `--set KEY=VALUE` applies to every run. Each run
trains in `SWEEP_DIR/<name>/` and leaves `DONE.json` there once it has finished, so running the same
command again skips finished runs, resumes unfinished ones from their checkpoints and retries
failed ones (their `FAILED.json` holds the exit code; `train.log` the output).
Final and best metrics of every run go to `SWEEP_DIR/results.csv`.

Seeds: `--seeds 0,1,2` trains every run once per seed (`seed`, which draws both the weights
and the data, set to each value; all runs of the first seed come first, so a partial sweep has
whole seeds). `--sweep seed=...` is the same axis inside the grid. With a seed axis,
`SWEEP_DIR/results_seeds.csv` has one row per configuration (the runs that differ only in
`seed`): how many seeds finished, and the mean and sample standard deviation (ddof 1) of every
figure over them. `experiments/plot.py` draws them as error bars.

Paired by seed: since `seed` also fixes the data order, runs with the same seed see the same
batches, and much of the seed noise is shared. `--baseline KEY=VALUE[,KEY=VALUE...]` names one
configuration (e.g. `moe.num_experts=0`, the dense model); every row of `results_seeds.csv` then
also has `delta_final_eval_cross_entropy_{mean,std}` over `delta_seeds`, the seeds both it and
the baseline finished: a run's final eval cross-entropy minus the baseline's at the same seed.
`--ceiling KEY=VALUE[,...]` (with `--baseline`) names a second configuration, e.g. the dense
model of the MoE's total parameters; each row then also has `gap_recovered_{mean,std}` over
`gap_seeds`: at each seed, (baseline - run) / (baseline - ceiling) of the final eval
cross-entropy, the share of the baseline-to-ceiling gap the run closes (0 = the baseline, 1 =
the ceiling).
"""

import argparse
import csv
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moe_jax.config import check_config_overrides

DONE_FILE = "DONE.json"
FAILED_FILE = "FAILED.json"
RESULTS_FILE = "results.csv"
SEED_RESULTS_FILE = "results_seeds.csv"
SEED_KEY = "seed"
PAIRED_FIGURE = "final_eval_cross_entropy"  # the figure `--baseline` pairs by seed


def parse_axis(spec: str) -> tuple[str, list[str]]:
    """'moe.k=1,2' -> ('moe.k', ['1', '2'])."""
    key, sep, values = spec.partition("=")
    if not sep or not key or not values:
        raise ValueError(f"--sweep {spec!r} is not KEY=V1,V2,... (e.g. moe.num_experts=2,4,8)")
    return key, values.split(",")


def parse_setting(spec: str) -> tuple[str, str]:
    """'train.num_steps=100' -> ('train.num_steps', '100')."""
    key, sep, value = spec.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {spec!r} is not KEY=VALUE (e.g. train.num_steps=100)")
    return key, value


def parse_baseline(spec: str) -> dict[str, str]:
    """'moe.num_experts=0,moe.k=1' -> {'moe.num_experts': '0', 'moe.k': '1'}; '' -> {}."""
    return dict(parse_setting(setting) for setting in spec.split(",") if setting)


def matches(row: dict, settings: dict[str, str]) -> bool:
    """Whether `row` (a run's overrides or a results row) has every one of `settings`."""
    return all(str(row.get(key)) == value for key, value in settings.items())


def expand(axes: list[tuple[str, list[str]]], zipped: bool) -> list[dict[str, str]]:
    """The runs of a sweep: one dict of overrides per run, in a stable order."""
    if not axes:
        return [{}]
    keys = [key for key, _ in axes]
    value_lists = [values for _, values in axes]
    if zipped:
        lengths = {len(values) for values in value_lists}
        if len(lengths) != 1:
            sizes = ", ".join(f"{key}: {len(values)}" for key, values in axes)
            raise ValueError(f"--zip needs axes of equal length, got {sizes}")
        combos = zip(*value_lists)
    else:
        combos = itertools.product(*value_lists)
    return [dict(zip(keys, combo)) for combo in combos]


def with_seeds(runs: list[dict[str, str]], seeds: list[str]) -> list[dict[str, str]]:
    """Every run once per seed, seed-major: [{**run, 'seed': s} for s in seeds for run in runs]."""
    return [{**run, SEED_KEY: seed} for seed in seeds for run in runs]


def run_name(overrides: dict[str, str]) -> str:
    """A directory name that says what the run changes: 'moe.k-2__moe.num_experts-8'."""
    if not overrides:
        return "default"
    parts = [f"{key}-{value}" for key, value in overrides.items()]
    return fit_file_name("__".join(parts).replace("/", "_").replace(":", "_"))


MAX_FILE_NAME_BYTES = 255  # ext4, xfs, APFS and tmpfs refuse a longer path component


def fit_file_name(stem: str, suffix: str = "") -> str:
    """`stem + suffix` when it fits in one path component; else the stem cut short and ended by
    a 10-hex-digit hash of the whole stem, so that distinct long stems stay distinct."""
    name = stem + suffix
    if len(name.encode()) <= MAX_FILE_NAME_BYTES:
        return name
    digest = "-" + hashlib.sha1(stem.encode()).hexdigest()[:10]
    room = MAX_FILE_NAME_BYTES - len((digest + suffix).encode())
    head = stem.encode()[:room].decode(errors="ignore")
    return head + digest + suffix


def train_command(config: str, workdir: Path, overrides: dict[str, str]) -> list[str]:
    command = [sys.executable, "-m", "moe_jax.train", f"--config={config}", f"--workdir={workdir}"]
    return command + [f"--config.{key}={value}" for key, value in overrides.items()]


def read_metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def reached_end(workdir: Path) -> bool:
    """Whether the run logged its last step (`train.num_steps` of its config.json).

    The trainer exits 0 both when it finishes and when SIGTERM stops it early (after saving a
    checkpoint), so the exit code alone cannot tell a finished run from a preempted one.
    """
    config_path = workdir / "config.json"
    if not config_path.exists():
        return False
    num_steps = json.loads(config_path.read_text())["train"]["num_steps"]
    steps = [r["step"] for r in read_metrics(workdir) if r.get("split") == "train"]
    return bool(steps) and steps[-1] >= num_steps


def summarize(workdir: Path) -> dict[str, float]:
    """Final and best figures of one run, from its metrics.jsonl.

    `loss` is the training objective (cross-entropy plus the weighted auxiliary losses);
    `cross_entropy` alone is what compares models with different auxiliary losses.
    """
    records = read_metrics(workdir)
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    summary: dict[str, float] = {}
    if train:
        last = train[-1]
        summary["final_step"] = last["step"]
        summary["final_train_loss"] = last["loss"]
        for key in (
            "cross_entropy",
            "fraction_dropped",
            "aux_loss",
            "z_loss",
            "router_logit_max",
            "router_confidence",
        ):
            if key in last:
                summary[f"final_{key}"] = last[key]
        if "z_loss" in last:
            summary["max_z_loss"] = max(r["z_loss"] for r in train)
        speeds = sorted(r["tokens_per_second"] for r in train if r.get("tokens_per_second"))
        if speeds:
            summary["median_tokens_per_second"] = speeds[len(speeds) // 2]
    if evals:
        summary["final_eval_loss"] = evals[-1]["loss"]
        summary["best_eval_loss"] = min(r["loss"] for r in evals)
        for key in ("cross_entropy", "accuracy", "fraction_dropped"):
            if key in evals[-1]:
                summary[f"final_eval_{key}"] = evals[-1][key]
    return summary


def write_results(
    sweep_dir: Path,
    runs: list[dict[str, str]],
    names: list[str],
    baseline: dict[str, str] | None = None,
    ceiling: dict[str, str] | None = None,
) -> Path:
    """One row per run: its overrides, its status and its summary; missing values left empty."""
    rows = []
    for overrides, name in zip(runs, names):
        workdir = sweep_dir / name
        status = "unfinished"
        for marker in (workdir / DONE_FILE, workdir / FAILED_FILE):
            if marker.exists():
                status = json.loads(marker.read_text())["status"]
        rows.append({"run": name, "status": status, **overrides, **summarize(workdir)})
    if any(SEED_KEY in overrides for overrides in runs):
        write_csv(sweep_dir / SEED_RESULTS_FILE, aggregate_seeds(rows, baseline, ceiling))
    return write_csv(sweep_dir / RESULTS_FILE, rows)


def aggregate_seeds(
    rows: list[dict],
    baseline: dict[str, str] | None = None,
    ceiling: dict[str, str] | None = None,
) -> list[dict]:
    """One row per configuration of `rows` (results.csv rows as dicts of strings or numbers).

    Rows with the same values in every column other than `seed`, the summary figures, `run` and
    `status` are one configuration; only finished runs count. A row holds the configuration's
    settings, `seeds` (the finished seeds, '/'-separated), `num_seeds`, and for every figure F
    of `summarize` `F_mean` and `F_std` (sample standard deviation, ddof 1; empty for one seed).
    Configurations keep the order of their first row. With `baseline` (settings that pick out
    one configuration), each row also has the seed-paired deltas of `PAIRED_FIGURE`, and with
    `ceiling` as well the share of the gap recovered (see the module docstring).
    """
    figures = [key for row in rows for key in row if key not in ("run", "status", SEED_KEY)]
    figures = list(dict.fromkeys(key for key in figures if "." not in key))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        settings = tuple(
            (key, str(value))
            for key, value in row.items()
            if key not in ("run", "status", SEED_KEY) and key not in figures
        )
        group = groups.setdefault(settings, [])
        if row.get("status") == "finished":
            group.append(row)
    aggregated = []
    for settings, finished in groups.items():
        row = {**dict(settings), "seeds": "/".join(str(r.get(SEED_KEY, "")) for r in finished)}
        row["num_seeds"] = len(finished)
        for figure in figures:
            values = [float(r[figure]) for r in finished if r.get(figure) not in (None, "")]
            if values:
                row[f"{figure}_mean"] = float(np.mean(values))
                row[f"{figure}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else ""
        aggregated.append(row)
    if baseline:
        _add_paired_deltas(aggregated, list(groups.values()), baseline, ceiling)
    return aggregated


def _by_seed(finished: list[dict]) -> dict[str, float]:
    return {
        str(row[SEED_KEY]): float(row[PAIRED_FIGURE])
        for row in finished
        if row.get(PAIRED_FIGURE) not in (None, "")
    }


def _one_configuration(aggregated: list[dict], settings: dict, flag: str) -> int:
    """The index of the one aggregated row that `settings` picks out, or a ValueError."""
    found_at = [index for index, row in enumerate(aggregated) if matches(row, settings)]
    if len(found_at) != 1:
        found = "no configuration" if not found_at else f"{len(found_at)} configurations"
        raise ValueError(
            f"{flag} {settings} matches {found}; name settings that pick out exactly one"
        )
    return found_at[0]


def _mean_and_std(values: list[float]) -> tuple[float | str, float | str]:
    """Mean and sample standard deviation (ddof 1); '' where there are too few values."""
    mean = float(np.mean(values)) if values else ""
    return mean, float(np.std(values, ddof=1)) if len(values) > 1 else ""


def _add_paired_deltas(
    aggregated: list[dict], groups: list[list[dict]], baseline: dict, ceiling: dict | None
) -> None:
    """Adds `delta_seeds` and the `PAIRED_FIGURE` deltas' mean and std to each aggregated row,
    and with `ceiling` `gap_seeds` and the share of the gap recovered."""
    reference = _by_seed(groups[_one_configuration(aggregated, baseline, "--baseline")])
    top = _by_seed(groups[_one_configuration(aggregated, ceiling, "--ceiling")]) if ceiling else {}
    name = f"delta_{PAIRED_FIGURE}"
    for row, finished in zip(aggregated, groups):
        values = _by_seed(finished)
        seeds = [seed for seed in values if seed in reference]
        row["delta_seeds"] = "/".join(seeds)
        row[f"{name}_mean"], row[f"{name}_std"] = _mean_and_std(
            [values[seed] - reference[seed] for seed in seeds]
        )
        if ceiling:
            seeds = [seed for seed in seeds if seed in top and top[seed] != reference[seed]]
            shares = [(reference[s] - values[s]) / (reference[s] - top[s]) for s in seeds]
            row["gap_seeds"] = "/".join(seeds)
            row["gap_recovered_mean"], row["gap_recovered_std"] = _mean_and_std(shares)


def write_csv(path: Path, rows: list[dict]) -> Path:
    """`rows` as CSV with the union of their keys as columns (first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


class Sweep:
    """Runs the pending runs, at most `parallel` at a time, and stops them cleanly on a signal."""

    def __init__(self, config: str, sweep_dir: Path, parallel: int):
        self.config = config
        self.sweep_dir = sweep_dir
        self.parallel = parallel
        self.running: dict[str, tuple[subprocess.Popen, float]] = {}
        self.stopping = False
        self.failed: list[str] = []

    def start(self, name: str, overrides: dict[str, str]) -> None:
        workdir = self.sweep_dir / name
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / FAILED_FILE).unlink(missing_ok=True)
        log = (workdir / "train.log").open("a")
        command = train_command(self.config, workdir, overrides)
        print(f"[sweep] start {name}: {' '.join(command[1:])}", flush=True)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.running[name] = (process, time.time())

    def reap(self) -> None:
        for name, (process, started) in list(self.running.items()):
            if process.poll() is None:
                continue
            del self.running[name]
            elapsed = time.time() - started
            finished = process.returncode == 0 and reached_end(self.sweep_dir / name)
            if (self.stopping or process.returncode == 0) and not finished:
                print(f"[sweep] stopped {name}; it resumes on the next run", flush=True)
                continue
            if finished:
                status, marker = "finished", DONE_FILE
            else:
                status, marker = f"failed (exit {process.returncode})", FAILED_FILE
                self.failed.append(name)
            record = {"status": status, "seconds": round(elapsed, 1)}
            (self.sweep_dir / name / marker).write_text(json.dumps(record))
            print(f"[sweep] {status} {name} in {elapsed:.0f}s", flush=True)
            if not finished:  # the trainer's last words say why
                log = (self.sweep_dir / name / "train.log").read_text(errors="replace")
                print(f"[sweep]   {name}/train.log ends: {log.strip()[-400:]}", flush=True)

    def stop(self, signum, frame) -> None:
        """Pass the signal on: each trainer saves a checkpoint on SIGTERM and exits."""
        self.stopping = True
        for process, _ in self.running.values():
            process.send_signal(signal.SIGTERM)

    def run(self, pending: list[tuple[str, dict[str, str]]]) -> None:
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)
        queue = list(pending)
        while (queue and not self.stopping) or self.running:
            while queue and not self.stopping and len(self.running) < self.parallel:
                self.start(*queue.pop(0))
            time.sleep(0.2)
            self.reap()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="e.g. configs/switch.py:tiny")
    parser.add_argument("--sweep_dir", required=True, type=Path)
    parser.add_argument("--sweep", action="append", default=[], help="KEY=V1,V2,... (repeat)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run")
    parser.add_argument("--zip", action="store_true", help="pair the axes instead of a grid")
    parser.add_argument("--seeds", default="", help="S1,S2,...: every run once per seed")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument(
        "--baseline", default="", help="KEY=VALUE,...: the configuration seeds are paired with"
    )
    parser.add_argument(
        "--ceiling",
        default="",
        help="KEY=VALUE,...: with --baseline, the configuration whose gap to it runs close",
    )
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")

    try:
        axes = [parse_axis(spec) for spec in args.sweep]
        fixed = dict(parse_setting(spec) for spec in args.set)
        runs = [{**fixed, **overrides} for overrides in expand(axes, args.zip)]
        baseline = parse_baseline(args.baseline)
        ceiling = parse_baseline(args.ceiling)
    except ValueError as error:
        parser.error(str(error))
    if ceiling and not baseline:
        parser.error(f"--ceiling {args.ceiling!r} needs --baseline: the gap runs from it")
    if args.seeds:
        if any(key == SEED_KEY for key, _ in axes) or SEED_KEY in fixed:
            parser.error("--seeds and a 'seed' in --sweep or --set: give the seeds once")
        seeds = args.seeds.split(",")
        if not all(seed.isdigit() for seed in seeds) or len(set(seeds)) != len(seeds):
            parser.error(f"--seeds {args.seeds!r} is not distinct integers >= 0 (e.g. 0,1,2)")
        runs = with_seeds(runs, seeds)
        axes.append((SEED_KEY, seeds))
    keys = sorted({key for run in runs for key in run})
    try:  # every key is checked against the config before any run starts
        check_config_overrides(
            ["sweep", f"--config={args.config}"] + [f"--config.{k}=" for k in keys]
        )
    except ValueError as error:
        parser.error(str(error))
    for flag, settings, spec in (
        ("--baseline", baseline, args.baseline),
        ("--ceiling", ceiling, args.ceiling),
    ):
        configurations = {
            tuple(sorted((key, value) for key, value in run.items() if key != SEED_KEY))
            for run in runs
            if settings and matches(run, settings)
        }
        if settings and len(configurations) != 1:
            parser.error(
                f"{flag} {spec!r} matches {len(configurations)} configurations of "
                "the sweep; name settings that pick out exactly one (e.g. moe.num_experts=0)"
            )
    names = [run_name({key: run[key] for key, _ in axes}) for run in runs]
    if len(set(names)) != len(names):
        parser.error(f"two runs would share a directory: {sorted(names)}; use distinct values")
    args.sweep_dir.mkdir(parents=True, exist_ok=True)

    pending = [
        (name, run)
        for name, run in zip(names, runs)
        if not (args.sweep_dir / name / DONE_FILE).exists()
    ]
    skipped = len(runs) - len(pending)
    print(f"[sweep] {len(runs)} runs, {skipped} already done, {len(pending)} to run", flush=True)
    sweep = Sweep(args.config, args.sweep_dir, args.parallel)
    sweep.run(pending)
    path = write_results(args.sweep_dir, runs, names, baseline, ceiling)
    print(f"[sweep] results: {path}", flush=True)
    if sweep.stopping:
        return 130
    return 1 if sweep.failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

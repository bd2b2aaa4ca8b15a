"""The sweep's grid expansion, run naming and seed aggregation (experiments/sweep.py) and its
error-bar plots (experiments/plot.py), on hand-written run directories, without training."""

import csv
import hashlib
import json
import os

import numpy as np
import pytest

from experiments import plot, sweep
from moe_jax.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_is_the_product_of_the_axes_in_order():
    axes = [sweep.parse_axis("moe.num_experts=2,4"), sweep.parse_axis("moe.k=1,2")]
    runs = sweep.expand(axes, zipped=False)
    assert runs == [
        {"moe.num_experts": "2", "moe.k": "1"},
        {"moe.num_experts": "2", "moe.k": "2"},
        {"moe.num_experts": "4", "moe.k": "1"},
        {"moe.num_experts": "4", "moe.k": "2"},
    ]


def test_zip_pairs_axes_and_rejects_unequal_lengths():
    axes = [sweep.parse_axis("moe.num_experts=2,4"), sweep.parse_axis("model.d_ff=512,256")]
    assert sweep.expand(axes, zipped=True) == [
        {"moe.num_experts": "2", "model.d_ff": "512"},
        {"moe.num_experts": "4", "model.d_ff": "256"},
    ]
    with pytest.raises(ValueError, match="moe.k: 3"):
        sweep.expand(axes[:1] + [sweep.parse_axis("moe.k=1,2,3")], zipped=True)


def test_bad_specs_name_the_spec():
    with pytest.raises(ValueError, match="'moe.k'"):
        sweep.parse_axis("moe.k")
    with pytest.raises(ValueError, match="'=3'"):
        sweep.parse_setting("=3")


def test_run_names_are_distinct_paths():
    names = {
        sweep.run_name(run) for run in sweep.expand([sweep.parse_axis("data.name=a/b,a_c")], False)
    }
    assert names == {"data.name-a_b", "data.name-a_c"}
    assert all("/" not in name for name in names)


def test_seeds_multiply_the_runs_seed_major():
    runs = [{"moe.k": "1"}, {"moe.k": "2"}]
    assert sweep.with_seeds(runs, ["0", "1"]) == [
        {"moe.k": "1", "seed": "0"},
        {"moe.k": "2", "seed": "0"},
        {"moe.k": "1", "seed": "1"},
        {"moe.k": "2", "seed": "1"},
    ]


def seed_rows():
    """results.csv rows of 2 configurations x 3 seeds; one run failed, one has no eval."""
    rows = []
    values = {("1", "0"): 2.0, ("1", "1"): 2.2, ("1", "2"): 2.6, ("2", "0"): 1.5, ("2", "1"): 9.0}
    for (k, seed), ce in values.items():
        status = "failed (exit 1)" if ce == 9.0 else "finished"
        rows.append({"run": f"k{k}s{seed}", "status": status, "moe.k": k, "seed": seed})
        rows[-1].update(final_eval_cross_entropy=ce, final_step=100)
    rows.append({"run": "k2s2", "status": "finished", "moe.k": "2", "seed": "2", "final_step": 50})
    return rows


def test_aggregate_seeds_means_and_sample_stds_by_hand():
    first, second = sweep.aggregate_seeds(seed_rows())
    assert first["moe.k"] == "1" and first["seeds"] == "0/1/2" and first["num_seeds"] == 3
    # mean(2.0, 2.2, 2.6) = 2.2667; sample variance ((-.2667)^2 + (-.0667)^2 + .3333^2) / 2
    assert first["final_eval_cross_entropy_mean"] == pytest.approx(6.8 / 3)
    assert first["final_eval_cross_entropy_std"] == pytest.approx((0.186667 / 2) ** 0.5, 1e-4)
    assert first["final_step_mean"] == 100 and first["final_step_std"] == 0.0
    # the failed seed is left out; one eval value gives a mean and no std
    assert second["seeds"] == "0/2" and second["num_seeds"] == 2
    assert second["final_eval_cross_entropy_mean"] == 1.5
    assert second["final_eval_cross_entropy_std"] == ""
    assert second["final_step_mean"] == 75


def test_paired_deltas_subtract_the_baseline_of_the_same_seed_by_hand():
    rows = seed_rows()
    rows.append({"run": "k3s1", "status": "finished", "moe.k": "3", "seed": "1"})
    rows[-1].update(final_eval_cross_entropy=2.1, final_step=100)
    rows.append({"run": "k3s2", "status": "finished", "moe.k": "3", "seed": "2"})
    rows[-1].update(final_eval_cross_entropy=2.4, final_step=100)
    first, second, third = sweep.aggregate_seeds(rows, baseline={"moe.k": "1"})
    assert first["delta_seeds"] == "0/1/2" and first["delta_final_eval_cross_entropy_mean"] == 0
    # k=2 has an eval value at seed 0 only (seed 1 failed, seed 2 has none): 1.5 - 2.0
    assert second["delta_seeds"] == "0"
    assert second["delta_final_eval_cross_entropy_mean"] == pytest.approx(-0.5)
    assert second["delta_final_eval_cross_entropy_std"] == ""
    # k=3 at seeds 1 and 2: 2.1 - 2.2 = -0.1 and 2.4 - 2.6 = -0.2; std of the two is 0.0707
    assert third["delta_seeds"] == "1/2"
    assert third["delta_final_eval_cross_entropy_mean"] == pytest.approx(-0.15)
    assert third["delta_final_eval_cross_entropy_std"] == pytest.approx(0.005**0.5)
    # unpaired, k=3 and k=1 differ by less than k=1's own seed spread (std 0.306)
    assert third["final_eval_cross_entropy_mean"] - first["final_eval_cross_entropy_mean"] > -0.02


def test_share_of_the_gap_recovered_by_hand():
    # baseline k=1, ceiling k=4, run k=3; final eval cross-entropy per seed:
    #   seed 0: 2.0, 1.0, 1.5 -> (2.0 - 1.5) / (2.0 - 1.0) = 0.5
    #   seed 1: 3.0, 2.0, 2.2 -> (3.0 - 2.2) / (3.0 - 2.0) = 0.8
    #   seed 2: 2.5, no ceiling run, 2.0 -> no share
    values = {"1": (2.0, 3.0, 2.5), "4": (1.0, 2.0, None), "3": (1.5, 2.2, 2.0)}
    rows = []
    for k, per_seed in values.items():
        for seed, ce in enumerate(per_seed):
            if ce is not None:
                row = {"run": f"k{k}s{seed}", "status": "finished", "moe.k": k, "seed": str(seed)}
                rows.append({**row, "final_eval_cross_entropy": ce})
    baseline, ceiling, run = sweep.aggregate_seeds(rows, {"moe.k": "1"}, {"moe.k": "4"})
    assert run["gap_seeds"] == "0/1"
    assert run["gap_recovered_mean"] == pytest.approx(0.65)
    assert run["gap_recovered_std"] == pytest.approx(0.3 / 2**0.5)  # sample std of 0.5, 0.8
    assert baseline["gap_recovered_mean"] == 0 and ceiling["gap_recovered_mean"] == 1
    assert run["delta_seeds"] == "0/1/2"  # the paired delta needs no ceiling run
    with pytest.raises(ValueError, match="--ceiling {'moe.k': '5'} matches no configuration"):
        sweep.aggregate_seeds(rows, {"moe.k": "1"}, {"moe.k": "5"})


def test_seed_results_and_error_bar_plots_from_run_directories(tmp_path):
    runs = sweep.with_seeds([{"moe.k": "1"}, {"moe.k": "2"}], ["0", "1"])
    names = [sweep.run_name(run) for run in runs]
    for index, name in enumerate(names):
        workdir = tmp_path / name
        workdir.mkdir()
        (workdir / sweep.DONE_FILE).write_text(json.dumps({"status": "finished"}))
        config = {"train": {"num_steps": 20, "batch_size": 2, "seq_len": 5}}
        (workdir / "config.json").write_text(json.dumps(config))
        records = [
            {
                "step": 10,
                "split": "train",
                "loss": 3.0,
                "cross_entropy": 3.0,
                "tokens_per_second": 10,
            },
            {"step": 10, "split": "eval", "loss": 3.0, "cross_entropy": 3.0 - 0.1 * index},
            {
                "step": 20,
                "split": "train",
                "loss": 2.0,
                "cross_entropy": 2.0,
                "tokens_per_second": 20,
            },
            {"step": 20, "split": "eval", "loss": 2.0, "cross_entropy": 2.0 - 0.1 * index},
        ]
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sweep.write_results(tmp_path, runs, names)
    with (tmp_path / sweep.SEED_RESULTS_FILE).open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["moe.k"], row["seeds"]) for row in rows] == [("1", "0/1"), ("2", "0/1")]
    # k=1 runs are indices 0 and 2: final eval 2.0 and 1.8
    assert float(rows[0]["final_eval_cross_entropy_mean"]) == pytest.approx(1.9)
    assert float(rows[0]["final_eval_cross_entropy_std"]) == pytest.approx(0.02**0.5)
    # 10 steps x 10 tokens at 10 tokens/s, then 10 steps x 10 tokens at 20 tokens/s
    assert plot.eval_points(records, 10) == {10: (3.0 - 0.3, 10.0), 20: (2.0 - 0.3, 15.0)}
    # k=2 minus k=1 at the same seed: runs 1 - 0 and 3 - 2, -0.1 at both eval steps
    ((label, (steps, mean, std, seeds)),) = plot.paired_delta_curves(
        tmp_path, plot.find_runs(tmp_path), {"moe.k": "1"}
    ).items()
    assert label == "moe.k=2" and steps == [10, 20] and seeds == 2
    np.testing.assert_allclose(mean, [-0.1, -0.1])
    np.testing.assert_allclose(std, 0.0, atol=1e-12)
    written = {path.name for path in plot.make_plots(tmp_path, baseline={"moe.k": "1"})}
    assert {"final_eval.png", "loss_curves_seeds.png", "loss_curves.png"} <= written
    assert "paired_deltas.png" in written
    assert (tmp_path / "final_eval.png").stat().st_size > 1000
    assert "gap_recovered.png" not in written  # no --ceiling
    sweep.write_results(tmp_path, runs, names, baseline={"moe.k": "1"}, ceiling={"moe.k": "2"})
    written = {path.name for path in plot.make_plots(tmp_path, baseline={"moe.k": "1"})}
    assert "gap_recovered.png" in written
    assert (tmp_path / "gap_recovered.png").stat().st_size > 1000


def test_gap_figure_labels_a_configuration_by_its_departures_from_the_common_settings():
    keys = ["moe.num_experts", "moe.k", "loss.z_coef"]
    rows = [
        {"moe.num_experts": "0", "moe.k": "1", "loss.z_coef": "0"},
        {"moe.num_experts": "8", "moe.k": "1", "loss.z_coef": "0"},
        {"moe.num_experts": "8", "moe.k": "2", "loss.z_coef": "0"},
        {"moe.num_experts": "8", "moe.k": "1", "loss.z_coef": "0.001"},
    ]
    labels = [plot.departures_label(row, rows, keys) for row in rows]
    assert labels == [
        "moe.num_experts=0",
        "the common settings",
        "moe.k=2",
        "loss.z_coef=0.001",
    ]


def test_summary_keeps_the_last_router_confidence(tmp_path):
    records = [
        {"step": 1, "split": "train", "loss": 2.0, "router_confidence": 0.2},
        {"step": 2, "split": "train", "loss": 1.0, "router_confidence": 0.3},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert sweep.summarize(tmp_path)["final_router_confidence"] == 0.3


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--seeds=0,0"], "is not distinct integers"),
        (["--seeds=a"], "is not distinct integers"),
        (["--seeds=0,1", "--sweep=seed=2,3"], "give the seeds once"),
        (["--seeds=0,1", "--sweep=moe.k=1,2", "--baseline=moe.k=4"], "matches 0 configurations"),
        (["--seeds=0,1", "--sweep=moe.k=1,2", "--ceiling=moe.k=2"], "--ceiling 'moe.k=2' needs"),
        (
            ["--seeds=0", "--sweep=moe.k=1,2", "--baseline=moe.k=1", "--ceiling=moe.k=3"],
            "--ceiling 'moe.k=3' matches 0 configurations",
        ),
        (
            ["--seeds=0", "--sweep=moe.k=1,2", "--sweep=moe.num_experts=4,8", "--baseline=moe.k=1"],
            "matches 2 configurations",
        ),
    ],
)
def test_bad_seeds_are_refused_before_any_run(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as error:
        sweep.main(["--config=configs/switch.py:tiny", f"--sweep_dir={tmp_path / 's'}", *bad])
    assert error.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_expert_load_panels_name_the_sparse_layers_as_the_routing_report(tmp_path, monkeypatch):
    # configs/switch.py:tiny: 4 decoder layers, experts in every other FFN (layers 1 and 3)
    config = load_config_file(os.path.join(ROOT, "configs", "switch.py") + ":tiny")
    (tmp_path / "config.json").write_text(config.to_json())
    load = [[0.5, 0.5, 0, 0, 0, 0, 0, 0], [0.125] * 8]  # [sparse layers, experts]
    records = [{"step": step, "split": "train", "expert_load": load} for step in (10, 20)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = {}
    monkeypatch.setattr(plot, "save", lambda figure, path: figures.setdefault(path.name, figure))
    plot.make_plots(tmp_path)
    axes = figures[f"expert_load_{tmp_path.name}.png"].axes
    labels = [axis.get_ylabel() for axis in axes if axis.get_ylabel() != "load"]  # not colorbars
    assert labels == ["decoder layer 1\nexpert", "decoder layer 3\nexpert"]


def test_long_run_names_fit_one_path_component_and_stay_distinct(tmp_path):
    # RESULTS.md (n) zips 11 axes: its run names are ~250 bytes and 'expert_load_' + '.png'
    # pushed the figure's name past the 255 bytes a file system takes (OSError before the fix)
    axes = {f"moe.axis_number_{index}": "1.25" for index in range(11)}
    names = [sweep.run_name({**axes, "seed": seed}) for seed in ("0", "1")]
    assert len(names[0]) > 255 - len("expert_load_.png")
    figure_names = [sweep.fit_file_name(f"expert_load_{name}", ".png") for name in names]
    assert all(len(name.encode()) <= 255 for name in names + figure_names)
    assert len(set(figure_names)) == 2 and all(n.endswith(".png") for n in figure_names)
    assert sweep.fit_file_name("short", ".png") == "short.png"
    cut = sweep.fit_file_name("x" * 300)
    digest = hashlib.sha1(("x" * 300).encode()).hexdigest()[:10]
    assert cut == "x" * (255 - 11) + "-" + digest
    load = [[0.5, 0.5]]  # [sparse layers, experts]
    records = [{"step": step, "split": "train", "expert_load": load} for step in (10, 20)]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records)
        )
    written = {path.name for path in plot.make_plots(tmp_path)}
    assert set(figure_names) <= written
    assert all((tmp_path / name).exists() for name in figure_names)

"""The training-throughput benchmark runs end to end on a micro model; its FLOP count by hand."""

import sys

import pytest

from experiments import benchmark_train

MICRO = [
    "model.d_model=32", "model.num_heads=2", "model.head_dim=16", "model.d_ff=64",
    "model.num_layers=2", "train.seq_len=32", "train.batch_size=2",
]  # fmt: skip


def test_micro_dense_run_reports_consistent_figures(monkeypatch, capsys):
    argv = ["benchmark_train.py", "--config=configs/dense.py:tiny", "--steps", "1"]
    argv += ["--ceiling-size", "32", *(arg for item in MICRO for arg in ("--set", item))]
    monkeypatch.setattr(sys, "argv", argv + ["--platform", "cpu", "--peak-tflops", "0.5"])
    benchmark_train.main()
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.endswith("platform cpu: dropless = blocked sort (moe_jax.blocked); the "
                           "allocator matters (README)")  # fmt: skip
    lines = lines[2:]
    rows = dict(tuple(cell.strip() for cell in line.strip("|").split("|")) for line in lines)
    # per token and layer: q, k, v, o projections 2 * 32 * 4 * 32 = 8192; causal scores and
    # context counted in full 2 * 2 * 32 * 32 = 4096; gated-GELU FFN 2 * 32 * 64 * 3 = 12288;
    # two layers, plus the logits 2 * 32 * 384 (the tiny corpus's vocabulary) = 24576
    assert float(rows["model FLOP per token, forward"]) == 2 * (8192 + 4096 + 12288) + 24576
    step_ms = float(rows["step ms"])
    assert float(rows["tokens/s"]) == pytest.approx(64 / step_ms * 1e3, rel=0.01, abs=1)
    parts = [float(rows[f"{name} ms"]) for name in ("forward", "backward", "optimizer")]
    assert sum(parts) == pytest.approx(step_ms, abs=0.01)
    model_rate = float(rows["model GFLOP/s"]) * 1e9
    peak_mfu = float(rows["MFU vs the peak of 0.5 TFLOP/s"].rstrip("%")) / 100
    assert peak_mfu == pytest.approx(model_rate / 0.5e12, rel=0.01, abs=0.001)


@pytest.mark.parametrize("platform", ["accelerator", "gpu", "tpu"])
def test_absent_platform_stops_at_once_naming_it(monkeypatch, capsys, platform):
    monkeypatch.setattr(sys, "argv", ["benchmark_train.py", "--platform", platform])
    with pytest.raises(SystemExit):
        benchmark_train.main()
    error = capsys.readouterr().err
    assert f"--platform {platform}:" in error
    expected = "jax[cuda12]" if platform == "accelerator" else f"no {platform} backend"
    assert expected in error


def test_unknown_override_is_named(monkeypatch, capsys):
    argv = ["benchmark_train.py", "--set", "model.d_modle=3"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        benchmark_train.main()
    assert "no key 'model.d_modle'" in capsys.readouterr().err

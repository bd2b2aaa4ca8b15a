"""The MoE layer benchmark runs end to end on tiny shapes and reports what BENCHMARKS.md quotes."""

import re
import sys

import pytest

from experiments import benchmark_moe

TINY = ["--tokens", "128", "--seq-len", "64", "--d-model", "16", "--d-ff", "32"]


def _run(monkeypatch, capsys, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", ["benchmark_moe.py", *TINY, *args])
    benchmark_moe.main()
    return capsys.readouterr().out


def test_table_has_a_row_per_case_and_summaries(monkeypatch, capsys):
    backends = "gather,dropless,experts-only"
    out = _run(
        monkeypatch, capsys, "--experts", "2,4", "--k", "2", "--backends", backends,
        "--group-size", "64", "--rounds", "2",
    )  # fmt: skip
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| swiglu")]
    assert [(row[1].strip(), row[3].strip()) for row in rows] == [
        ("-", "dense (H=2x32)"),
        ("2", "gather"),
        ("2", "dropless"),
        ("2", "experts-only"),
        ("4", "gather"),
        ("4", "dropless"),
        ("4", "experts-only"),
    ]
    ms = [float(row[4]) for row in rows]
    ratios = [float(row[7]) for row in rows]
    assert all(value > 0 for value in ms)
    assert ratios[0] == 1.0
    # every ratio is that row's time over the dense row's; ms are printed to 0.1
    for value, ratio in zip(ms[1:], ratios[1:], strict=True):
        assert ratio == pytest.approx(value / ms[0], abs=0.01 + 0.05 * (1 + ratio) / ms[0])
    summary = re.findall(r"E=(\d+): (\w+) [\d.]+ ms, ([\d.]+)x dense, ([\d.]+)x", out)
    assert [entry[0] for entry in summary] == ["2", "4"]
    assert summary[0][3] == "1.00"
    # the expert FFN alone is reported on its own, never as a dispatch backend
    alone = re.findall(r"E=(\d+): ([\d.]+)x its time at the first E$", out, re.MULTILINE)
    assert [entry[0] for entry in alone] == ["2", "4"]
    for num_experts, backend, ratio, _ in summary:
        candidates = {
            row[3].strip(): float(row[7])
            for row in rows
            if row[1].strip() == num_experts and row[3].strip() != "experts-only"
        }
        assert backend in candidates
        assert float(ratio) == pytest.approx(min(candidates.values()), abs=0.011)


def test_tokens_must_fill_whole_sequences(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmark_moe.py", "--tokens", "100", "--seq-len", "64"])
    with pytest.raises(SystemExit):
        benchmark_moe.main()
    assert "--tokens 100 is not a multiple of --seq-len 64" in capsys.readouterr().err

"""The sweep's grid expansion and run naming (experiments/sweep.py), without training."""

import pytest

from experiments import sweep


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

"""Expert merging (moe_jax.merge): grouping by router similarity and usage-weighted averages on
a hand-checked case, exactness when the merged experts are identical copies, bad targets
refused before anything is written, and the merged run's step-0 checkpoint."""

import jax
import numpy as np
import pytest
from test_upcycle import TOKENS, moe_config, upcycled

from moe_jax import merge, train
from moe_jax.upcycle import flat_params, set_params

DEVICES = jax.devices()[:1]


def test_groups_and_usage_weighted_averages_hand_checked():
    # router rows (columns of f32[M=2, E=4]): experts 0, 1 point one way, 2, 3 the other
    router = np.array([[1.0, 0.9, 0.0, 0.1], [0.0, 0.1, 1.0, 0.9]], np.float32)
    usage = np.array([1.0, 3.0, 1.0, 0.0])
    groups = merge.group_experts(router, usage, 2)
    assert groups == [[0, 1], [2, 3]]
    wi = np.arange(4, dtype=np.float32).reshape(4, 1, 1) * np.ones((4, 2, 3), np.float32)
    experts, rows = merge.merge_layer({"wi": wi}, {"kernel": router}, groups, usage)
    # group [0, 1] with usage 1 : 3, group [2, 3] with usage 1 : 0
    np.testing.assert_allclose(experts["wi"][:, 0, 0], [(0 * 1 + 1 * 3) / 4, 2.0])
    np.testing.assert_allclose(rows["kernel"], [[(1.0 + 3 * 0.9) / 4, 0.0], [0.3 / 4, 1.0]])
    assert experts["wi"].shape == (2, 2, 3)
    # no usage at all in a group: equal weights
    _, rows = merge.merge_layer({"wi": wi}, {"kernel": router}, groups, np.zeros(4))
    np.testing.assert_allclose(rows["kernel"][:, 1], [0.05, 0.95], rtol=1e-6)
    # 3 groups: (0, 1) and (2, 3) are equally similar; the tie goes to the lowest indices
    assert merge.group_experts(router, usage, 3) == [[0, 1], [2], [3]]


def test_merging_identical_copies_keeps_the_function():
    """An upcycled model (every expert a copy of one FFN; top-2 renormalised, dropless) merged
    from 4 to 2 experts computes the same logits, with 2 experts per sparse layer."""
    config = moe_config()
    _, source = upcycled(moe_config(moe__num_experts=0), config)
    small = moe_config(moe__num_experts=2)
    _, target = upcycled(moe_config(moe__num_experts=0), small)
    usage = np.random.default_rng(0).uniform(size=(2, 4))  # 2 sparse layers of 4 layers
    set_params(target, merge.merge_params(flat_params(source), flat_params(target), 2, usage))
    layer = target.decoder.segments[0][0].layers[1].ffn
    assert layer.wi[...].shape == (2, 32, 64) and layer.router.kernel[...].shape == (32, 2)
    want, _ = source(TOKENS, deterministic=True)
    got, aux = target(TOKENS, deterministic=True)
    assert aux.expert_load.shape == (2, 2)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """Step 0 of a run of a tiny top-1 MoE (4 experts, random weights)."""
    workdir = str(tmp_path_factory.mktemp("source"))
    train.save_initial_checkpoint(moe_config(moe__k=1), workdir, devices=DEVICES)
    return workdir


@pytest.mark.parametrize(
    "num_experts, message", [(4, "fewer than the model's 4"), (0, "fewer than the k=1")]
)
def test_bad_targets_are_refused_before_writing(source_dir, tmp_path, num_experts, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        merge.merge_run(source_dir, num_experts, str(out), devices=DEVICES)
    assert not out.exists()


def test_merged_run_holds_the_merged_experts(source_dir, tmp_path):
    out = str(tmp_path / "merged")
    merge.merge_run(source_dir, 2, out, usage_batches=1, devices=DEVICES)
    config, model, step = train.restore_for_inference(out)
    assert (config.moe.num_experts, step) == (2, 0)
    _, source, _ = train.restore_for_inference(source_dir)
    usage = merge.measure_usage(source, config, 1)
    np.testing.assert_allclose(usage.sum(axis=1), 1.0, rtol=1e-5)
    want = merge.merge_params(flat_params(source), flat_params(model), 2, usage)
    for path, value in flat_params(model).items():
        np.testing.assert_allclose(value, want[path], rtol=1e-6, err_msg=str(path))

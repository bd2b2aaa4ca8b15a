"""The training program: exact resume (clean stop, SIGTERM, kill -9), sharded runs against one
device, divergence handling, the CLI and its refusals of bad input.

Runs are tiny (d_model 32, 2 layers, 4 experts, batch 8 x 32 tokens). Compilation dominates, so
the module shares a persistent XLA compilation cache with its subprocesses, and the losses of
one uninterrupted single-device run are the oracle for several tests.
"""

import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import AbstractMesh, AxisType, PartitionSpec
from tiny_training import TINY_TRAINING, configured
from xla_flags import flags_with_devices

from configs import set_fsdp
from moe_jax import (
    checkpoint,
    data,
    decode,
    metrics,
    optim,
    parallel,
    run_identity,
    train,
    train_state,
)
from moe_jax.config import check_config_overrides, load_config_file
from moe_jax.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "switch.py") + ":tiny"
NUM_STEPS = 40
SMALL = {
    **TINY_TRAINING,
    "train.num_steps": NUM_STEPS,
    "train.eval_every": 0,
    "train.checkpoint_every": 10,
}
SUBPROCESS_TIMEOUT = 300


def small_config(**overrides):
    """The tiny Switch config shrunk further; `overrides` use '__' for '.' in keys."""
    return configured(load_config_file(CONFIG), SMALL, overrides)


def train_records(workdir):
    with open(os.path.join(workdir, metrics.METRICS_FILE), encoding="utf-8") as file:
        return [record for record in map(json.loads, file) if record["split"] == "train"]


def train_losses(workdir):
    return [(r["step"], r["loss"]) for r in train_records(workdir)]


def copy_checkpoints(reference_dir, workdir, steps):
    """`workdir` with copies of the reference run's checkpoints of `steps`."""
    for step in steps:
        shutil.copytree(
            os.path.join(reference_dir, checkpoint.CHECKPOINT_DIR, str(step)),
            os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step)),
        )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A persistent compilation cache for this module and its subprocesses."""
    directory = str(tmp_path_factory.mktemp("jax_cache"))
    compilation_cache.set_cache_dir(directory)
    compilation_cache.reset_cache()
    yield directory
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted single-device run: (workdir, [(step, loss), ...])."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = train.run(small_config(), workdir, devices=jax.devices()[:1])
    assert (result.step, result.preempted) == (NUM_STEPS, False)
    return workdir, train_losses(workdir)


def cli(workdir, cache_dir, *extra):
    """A `python -m moe_jax.train` process on one CPU device with the small settings."""
    env = dict(
        os.environ,
        XLA_FLAGS=flags_with_devices(1),
        JAX_PLATFORMS="cpu",
        JAX_DEFAULT_MATMUL_PRECISION="highest",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
    )
    overrides = [f"--config.{key}={value}" for key, value in SMALL.items()]
    command = [sys.executable, "-m", "moe_jax.train", f"--config={CONFIG}", f"--workdir={workdir}"]
    return subprocess.Popen(
        command + overrides + list(extra),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, process, timeout=SUBPROCESS_TIMEOUT):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"process ended early: {process.communicate()[1][-3000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.02)


def finish(process):
    try:
        _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, stderr


def test_outputs_of_a_run(reference):
    workdir, losses = reference
    assert [step for step, _ in losses] == list(range(1, NUM_STEPS + 1))
    with open(os.path.join(workdir, metrics.METRICS_FILE), encoding="utf-8") as file:
        first = json.loads(file.readline())
    for key in ("learning_rate", "aux_loss", "z_loss", "fraction_dropped", "tokens_per_second"):
        assert np.isfinite(first[key]), key
    for key in ("expert_load", "expert_load_routed"):
        assert np.asarray(first[key]).shape == (1, 4), key  # 1 sparse layer of 4 experts
        np.testing.assert_allclose(np.sum(first[key]), 1.0, rtol=1e-5)
    with open(os.path.join(workdir, run_identity.HISTORY_FILE), encoding="utf-8") as file:
        history = [json.loads(line) for line in file]
    assert [(h["event"], h["step"], h["changed"]) for h in history] == [("start", 0, {})]
    assert os.listdir(os.path.join(workdir, metrics.TENSORBOARD_DIR))
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as file:
        assert json.load(file)["train"]["num_steps"] == NUM_STEPS
    # keep_checkpoints=3 of the saves at 10, 20, 30, 40
    assert sorted(os.listdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR))) == [
        "20",
        "30",
        "40",
    ]
    assert losses[-1][1] < losses[0][1]


def test_run_history_records_the_library_versions(reference):
    # the oracle: each library's own __version__ (the module names of the pip distributions)
    modules = {
        "jax": "jax",
        "jaxlib": "jaxlib",
        "flax": "flax",
        "optax": "optax",
        "orbax-checkpoint": "orbax.checkpoint",
        "qwix": "qwix",
        "numpy": "numpy",
        "transformers": "transformers",
        "torch": "torch",
        "libtpu": "libtpu",
    }
    expected = {
        name: importlib.import_module(module).__version__
        for name, module in modules.items()
        if importlib.util.find_spec(module.split(".")[0]) is not None
    }
    assert {"jax", "flax", "orbax-checkpoint", "numpy"} <= set(expected)
    workdir, _ = reference
    with open(os.path.join(workdir, run_identity.HISTORY_FILE), encoding="utf-8") as file:
        (start,) = [json.loads(line) for line in file]
    assert start["versions"] == expected


def test_resume_after_clean_stop_is_exact(reference, tmp_path):
    # Stop cleanly after step 20 by training a copy whose later checkpoints are removed: the
    # continued run must reproduce the reference's losses of steps 21..40 bit for bit.
    reference_dir, reference_losses = reference
    workdir = tmp_path / "resumed"
    checkpoints = workdir / checkpoint.CHECKPOINT_DIR
    shutil.copytree(
        os.path.join(reference_dir, checkpoint.CHECKPOINT_DIR, "20"), checkpoints / "20"
    )
    result = train.run(small_config(), str(workdir), devices=jax.devices()[:1])
    assert result.step == NUM_STEPS
    assert train_losses(workdir) == reference_losses[20:]


def test_sigterm_saves_and_kill_resumes_exactly(cache_dir, tmp_path):
    # One workdir goes through SIGTERM, a resumed process killed with -9 and a final resume; the
    # oracle is an uninterrupted process on the same single device (an in-process run with 8
    # fake devices may differ in the last bit of a reduction).
    uninterrupted = str(tmp_path / "uninterrupted")
    reference_process = cli(uninterrupted, cache_dir)
    workdir = str(tmp_path / "interrupted")
    checkpoints_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)

    # SIGTERM once training runs: a checkpoint of the current step, exit status 0.
    process = cli(workdir, cache_dir)
    metrics_file = os.path.join(workdir, metrics.METRICS_FILE)
    wait_for(lambda: os.path.exists(metrics_file) and os.path.getsize(metrics_file), process)
    process.send_signal(signal.SIGTERM)
    returncode, stderr = finish(process)
    assert returncode == 0, stderr[-3000:]
    saved = checkpoint.Checkpoints(checkpoints_dir, keep=3, read_only=True).latest_step()
    assert f"stopped by SIGTERM at step {saved}" in stderr
    next_save = (saved // 10 + 1) * 10
    assert next_save < NUM_STEPS, f"SIGTERM came too late (step {saved})"

    # The same command resumes; kill -9 once its next checkpoint is complete.
    process = cli(workdir, cache_dir)
    committed = os.path.join(checkpoints_dir, str(next_save), "commit_success.txt")
    wait_for(lambda: os.path.exists(committed), process)
    process.kill()
    assert finish(process)[0] == -signal.SIGKILL

    returncode, stderr = finish(cli(workdir, cache_dir))  # and again, to the end
    assert returncode == 0, stderr[-3000:]
    returncode, stderr = finish(reference_process)
    assert returncode == 0, stderr[-3000:]
    reference_losses = train_losses(uninterrupted)
    assert len(reference_losses) == NUM_STEPS
    assert train_losses(workdir) == reference_losses


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_eight_devices_match_one_device(reference, tmp_path, fsdp):
    _, reference_losses = reference
    steps = 10  # of the reference's schedule, whose horizon is NUM_STEPS
    config = small_config(
        mesh__data=2,
        mesh__expert=4,
        train__checkpoint_every=1000,
        train__num_steps=steps,
        train__schedule_steps=NUM_STEPS,
    )
    if fsdp:
        set_fsdp(config)
    result = train.run(config, str(tmp_path), devices=jax.devices())
    assert result.step == steps
    sharded = np.array([loss for _, loss in train_losses(tmp_path)])
    single = np.array([loss for _, loss in reference_losses[:steps]])
    np.testing.assert_allclose(sharded, single, rtol=1e-3)
    # FSDP: each device holds 1/8 of the embedding table and of Adam's moments of it, and
    # 1/2 (data) of an expert's input weight, its 4 experts split over 'expert'
    embedding = result.state.params["embed"]["embedding"]  # f32[384, 32]
    moment = result.state.opt_state[1][0].mu["embed"]["embedding"]
    expert_wi = result.state.params["decoder"]["segments"][0][0]["layers"][1]["ffn"]["wi"]
    shards = {
        "embedding": embedding.sharding.shard_shape(embedding.shape),
        "moment": moment.sharding.shard_shape(moment.shape),
        "expert_wi": expert_wi.sharding.shard_shape(expert_wi.shape[-3:]),
    }
    if fsdp:
        assert shards == {"embedding": (384, 4), "moment": (384, 4), "expert_wi": (1, 16, 64)}
    else:
        assert shards == {"embedding": (384, 32), "moment": (384, 32), "expert_wi": (1, 32, 64)}


def test_divergence_stops_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path, cache_dir):
    # A learning rate that jumps to 1e30 at update 5 (count 4): the parameter norm overflows at
    # step 5, so the run stops there; the checkpoint of step 4 stays the latest.
    def exploding_schedule(train_config):
        del train_config
        return lambda count: jnp.where(count < 4, 1e-3, 1e30)

    monkeypatch.setattr(optim, "make_schedule", exploding_schedule)
    config = small_config(train__checkpoint_every=2, train__log_every=100)
    with pytest.raises(train.TrainingDiverged, match="step 5") as error:
        train.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert "last good checkpoint is step 4" in str(error.value)
    assert "train.learning_rate" in str(error.value)
    checkpoints = checkpoint.Checkpoints(
        str(tmp_path / checkpoint.CHECKPOINT_DIR), keep=3, read_only=True
    )
    assert checkpoints.all_steps() == [2, 4]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mesh__data": 3}, "needs 3 devices but 8"),
        ({"mesh__data": 8, "train__batch_size": 12}, "train.batch_size=12"),
        ({"data__name": "text:/no/such/file.txt"}, "no such file"),
        ({"train__optimizer": "sgd"}, "train.optimizer='sgd'"),
        ({"mesh__data": 8, "moe__group_size": 64}, "moe.group_size=64"),
        (
            {"mesh__data": 1, "mesh__expert": 8},
            "ffn/wi of shape (4, 32, 64): dim 0 (logical axis 'expert') has size 4, which does "
            "not split over mesh axes ('expert',) of 8 devices (mesh.expert=8)",
        ),
        ({"mesh__data": 16}, "XLA_FLAGS=--xla_force_host_platform_device_count=16"),
        ({"train__learning_rate": -1.0}, "train.learning_rate=-1.0 must be > 0"),
        ({"moe__k": 0}, "moe.k=0 routes each token to no expert; set moe.k >= 1"),
        ({"train__eval_steps": 0}, "train.eval_steps=0 must be >= 1 (batches per evaluation)"),
        (
            {"train__eval_steps": -1, "train__eval_every": 2},
            "the synthetic corpus has no end, so it cannot be read in one full pass",
        ),
    ],
)
def test_bad_input_fails_before_writing(overrides, message, tmp_path):
    workdir = tmp_path / "run"
    config = small_config(**{"mesh__data": -1, **overrides})  # -1: all 8 devices
    with pytest.raises(train.SetupError, match=re.escape(message)):
        train.run(config, str(workdir))
    assert not workdir.exists()


def test_checkpoints_path_that_is_a_file_is_refused_before_training(tmp_path):
    (tmp_path / checkpoint.CHECKPOINT_DIR).write_text("not a directory")
    with pytest.raises(train.SetupError, match="checkpoints is a file, not a directory"):
        train.run(small_config(), str(tmp_path), devices=jax.devices()[:1])
    assert sorted(os.listdir(tmp_path)) == [checkpoint.CHECKPOINT_DIR]


def test_unprepared_tfds_dataset_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    workdir = tmp_path / "run"
    start = time.time()
    with pytest.raises(train.SetupError, match="not prepared"):
        config = small_config(data__name="tfds:tiny_shakespeare")
        train.run(config, str(workdir), devices=jax.devices()[:1])
    assert time.time() - start < 60
    assert not workdir.exists()


def test_incompatible_checkpoint_is_refused(reference):
    workdir, _ = reference
    config_file = os.path.join(workdir, "config.json")
    modified = os.path.getmtime(config_file)
    with pytest.raises(train.SetupError, match=r"model\.d_model: 32 \(checkpoint\) vs 64"):
        train.run(small_config(model__d_model=64), workdir, devices=jax.devices()[:1])
    assert os.path.getmtime(config_file) == modified


def test_unknown_config_key_suggests_close_matches(tmp_path):
    argv = ["train", f"--config={CONFIG}", "--config.train.num_stepz=3"]
    with pytest.raises(ValueError, match=r"did you mean --config\.train\.num_steps"):
        check_config_overrides(argv)
    argv = ["train", f"--config={CONFIG}", "--config.trian.num_steps=3"]
    with pytest.raises(ValueError, match=r"--config\.train\.num_steps"):
        check_config_overrides(argv)
    check_config_overrides(["train", f"--config={CONFIG}", "--config.train.num_steps=3"])


def test_cli_reports_bad_input_with_status(tmp_path, cache_dir):
    workdir = tmp_path / "run"
    returncode, stderr = finish(cli(str(workdir), cache_dir, "--config.loss.aux_cof=0.1"))
    assert returncode != 0
    assert "did you mean --config.loss.aux_coef" in stderr
    returncode, stderr = finish(cli(str(workdir), cache_dir, "--config.mesh.expert=2"))
    assert returncode == 1
    assert "needs 2 devices but 1" in stderr and "Traceback" not in stderr
    assert not workdir.exists()


def test_encoder_decoder_carries_router_bias_through_steps_and_checkpoints(tmp_path):
    # Aux-loss-free routing moves each expert's bias by exactly +-rate or 0 per step (DeepSeek-V3
    # sign update), so after 3 steps with rate 0.25 every bias is a multiple of 0.25 in
    # [-0.75, 0.75]; the bias is state, not a parameter, and must survive a checkpoint.
    config = small_config(
        model__kind="encoder_decoder",
        model__num_encoder_layers=2,
        model__num_decoder_layers=2,
        moe__router="aux_free",
        moe__bias_update_rate=0.25,
        train__num_steps=3,
        train__checkpoint_every=3,
        train__eval_every=3,
        train__eval_steps=1,
    )
    result = train.run(config, str(tmp_path), devices=jax.devices()[:1])
    biases = np.stack([np.asarray(leaf) for leaf in jax.tree.leaves(result.state.model_state)])
    assert biases.shape == (2, 4)  # one sparse layer in each stack, 4 experts
    np.testing.assert_array_equal(biases * 4, np.round(biases * 4))
    assert np.abs(biases).max() <= 0.75 and np.abs(biases).max() > 0
    with open(os.path.join(tmp_path, metrics.METRICS_FILE), encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    evaluation = [record for record in records if record["split"] == "eval"]
    assert [record["step"] for record in evaluation] == [3]
    assert np.isfinite(evaluation[0]["loss"]) and 0 <= evaluation[0]["accuracy"] <= 1
    assert evaluation[0]["eval_batches"] == 1  # which evaluation it was: train.eval_steps batches
    resumed = train.run(config, str(tmp_path), devices=jax.devices()[:1])  # nothing left to do
    assert resumed.step == 3
    for restored, trained in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(result.state)):
        np.testing.assert_array_equal(restored, trained)


def test_evaluation_can_read_the_whole_validation_split_once(tmp_path):
    # 2000 bytes of text: the validation split is the last 200, which cut into rows of 16 tokens
    # make 13 rows (the last one 8 tokens and padding), in batches of 4 rows: 4 batches, the last
    # one with a single real row.
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(bytes(range(32, 112)) * 25)
    overrides = dict(
        data__name=f"text:{corpus}", train__num_steps=3, train__eval_every=3, train__log_every=1
    )
    overrides.update(train__batch_size=4, train__seq_len=16, train__checkpoint_every=3)
    runs = {}
    for eval_steps in (-1, 2):
        workdir = tmp_path / f"eval_{eval_steps}"
        config = small_config(train__eval_steps=eval_steps, **overrides)
        train.run(config, str(workdir), devices=jax.devices()[:1])
        with open(workdir / metrics.METRICS_FILE, encoding="utf-8") as file:
            records = [json.loads(line) for line in file]
        (runs[eval_steps],) = [record for record in records if record["split"] == "eval"]
    assert runs[-1]["eval_batches"] == 4 and runs[-1]["eval_full_pass"] == 1
    assert runs[2]["eval_batches"] == 2 and runs[2]["eval_full_pass"] == 0
    assert np.isfinite(runs[-1]["loss"]) and runs[-1]["loss"] != runs[2]["loss"]


def eval_records(workdir):
    with open(os.path.join(workdir, metrics.METRICS_FILE), encoding="utf-8") as file:
        return [record for record in map(json.loads, file) if record["split"] == "eval"]


def forward_cross_entropy(model, batch) -> float:
    """The token-weighted mean cross-entropy of `model`'s eval forward pass on `batch`."""
    logits, _ = model(
        batch["inputs"],
        deterministic=True,
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
    )
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
    token_losses = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    return float((token_losses * batch["weights"]).sum() / batch["weights"].sum())


def test_dropless_evaluation_is_the_dropless_forward_pass(tmp_path, cache_dir):
    # Eval capacity factor 0.5: 4 experts x 4 slots for each group of 32 tokens, so at least
    # half the tokens drop; train.eval_dropless routes them all. The oracles are the restored
    # model's own forward passes on the evaluated batch, dropless and at the eval capacity.
    config = small_config(
        moe__capacity_factor_eval=0.5,
        train__num_steps=3,
        train__checkpoint_every=3,
        train__eval_every=3,
        train__eval_steps=1,
        train__eval_dropless=True,
    )
    train.run(config, str(tmp_path), devices=jax.devices()[:1])
    # a resume may switch it off: it changes no update, and each eval line says which it used
    config.train.update(num_steps=4, eval_dropless=False)
    train.run(config, str(tmp_path), devices=jax.devices()[:1])
    dropless_eval, capacity_eval = eval_records(tmp_path)
    assert (dropless_eval["step"], dropless_eval["eval_dropless"]) == (3, 1)
    assert (capacity_eval["step"], capacity_eval["eval_dropless"]) == (4, 0)
    for record in (capacity_eval, dropless_eval):  # restore_for_inference reads the latest
        run_config, model, step = train.restore_for_inference(str(tmp_path))
        assert step == record["step"]
        batch = data.dataset_from_config(run_config, "validation").batch(0)
        dropless = forward_cross_entropy(decode.inference_copy(model, dropless=True), batch)
        capacity = forward_cross_entropy(model, batch)
        expected = dropless if record["eval_dropless"] else capacity
        atol = 1e-5 * max(1.0, abs(expected))
        assert record["cross_entropy"] == pytest.approx(expected, rel=0, abs=atol)
        assert abs(capacity - dropless) > 100 * atol  # tokens drop at the eval capacity
        assert (record["fraction_dropped"] > 0) == (not record["eval_dropless"])
        shutil.rmtree(os.path.join(tmp_path, checkpoint.CHECKPOINT_DIR, str(step)))
    with open(tmp_path / run_identity.HISTORY_FILE, encoding="utf-8") as file:
        resume = json.loads(file.readlines()[-1])
    assert resume["changed"]["train.eval_dropless"] == [True, False]


def test_resume_refuses_a_different_run_naming_every_key(reference):
    # Same parameter shapes, different run: the router, k and the batch size all differ.
    workdir, _ = reference
    config_file = os.path.join(workdir, "config.json")
    modified = os.path.getmtime(config_file)
    config = small_config(moe__router="gshard_top2", moe__k=2, train__batch_size=16)
    with pytest.raises(train.SetupError) as error:
        train.run(config, workdir, devices=jax.devices()[:1])
    message = str(error.value)
    for line in (
        "moe.k: 1 (checkpoint) vs 2 (this run)",
        "moe.router: 'tokens_choose' (checkpoint) vs 'gshard_top2' (this run)",
        "train.batch_size: 8 (checkpoint) vs 16 (this run)",
    ):
        assert line in message
    assert os.path.getmtime(config_file) == modified


def test_raising_num_steps_continues_the_stored_schedule(reference, tmp_path):
    # The reference's cosine schedule ends at step 40 (its horizon) at 0.1 x the peak. Resuming
    # its last checkpoint with num_steps=44 keeps that horizon: steps 41..44 hold the final
    # rate instead of re-stretching the decay over 44 steps (a jump up).
    reference_dir, _ = reference
    final_rate = train_records(reference_dir)[-1]["learning_rate"]
    assert final_rate == pytest.approx(0.1 * small_config().train.learning_rate, rel=1e-6)
    copy_checkpoints(reference_dir, tmp_path, [40])
    result = train.run(small_config(train__num_steps=44), str(tmp_path), devices=jax.devices()[:1])
    assert result.step == 44
    rates = [(r["step"], r["learning_rate"]) for r in train_records(tmp_path)]
    assert rates == [(step, final_rate) for step in range(41, 45)]
    with open(tmp_path / "config.json", encoding="utf-8") as file:
        written = json.load(file)["train"]
    assert (written["num_steps"], written["schedule_steps"]) == (44, 40)
    with open(tmp_path / run_identity.HISTORY_FILE, encoding="utf-8") as file:
        history = [json.loads(line) for line in file]
    assert [(h["event"], h["step"], h["changed"]) for h in history] == [
        ("resume", 40, {"train.num_steps": [40, 44]})
    ]


def test_logged_metrics_are_the_window_means(reference, tmp_path):
    # Logging every 4 steps reports the mean of the 4 steps' values; the oracle is the reference
    # run, which logged every step (same schedule horizon, so the same steps).
    _, reference_losses = reference
    config = small_config(train__num_steps=8, train__log_every=4, train__schedule_steps=NUM_STEPS)
    train.run(config, str(tmp_path), devices=jax.devices()[:1])
    losses = [loss for _, loss in reference_losses]
    assert [step for step, _ in train_losses(tmp_path)] == [4, 8]
    np.testing.assert_allclose(
        [loss for _, loss in train_losses(tmp_path)],
        [np.mean(losses[0:4]), np.mean(losses[4:8])],
        rtol=1e-6,
    )


def test_unreadable_latest_checkpoint_names_it_and_the_way_back(reference, cache_dir, tmp_path):
    reference_dir, reference_losses = reference
    workdir = tmp_path / "damaged"
    copy_checkpoints(reference_dir, workdir, [30, 40])
    manifest = workdir / checkpoint.CHECKPOINT_DIR / "40" / "state" / "manifest.ocdbt"
    with open(manifest, "r+b") as file:
        file.truncate(os.path.getsize(manifest) // 2)
    returncode, stderr = finish(cli(str(workdir), cache_dir))
    assert returncode == 1
    assert "checkpoint step 40" in stderr and "is unreadable" in stderr
    assert "newest readable checkpoint is step 30" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) < 8, stderr
    assert not (workdir / "config.json").exists()
    move = next(line.strip() for line in stderr.splitlines() if line.strip().startswith("mv "))
    _, source, target = move.split()
    os.rename(source, target)  # the command the message gives
    result = train.run(small_config(), str(workdir), devices=jax.devices()[:1])
    assert result.step == NUM_STEPS
    assert train_losses(workdir) == reference_losses[30:]


def test_empty_step_directory_is_named_as_such(reference, tmp_path):
    reference_dir, _ = reference
    copy_checkpoints(reference_dir, tmp_path, [40])
    os.makedirs(tmp_path / checkpoint.CHECKPOINT_DIR / "999")
    with pytest.raises(train.SetupError, match=r"step 999 \(.*\) is empty") as error:
        train.run(small_config(), str(tmp_path), devices=jax.devices()[:1])
    assert "newest readable checkpoint is step 40" in str(error.value)


def test_sigint_saves_and_stops_like_sigterm(cache_dir, tmp_path):
    workdir = str(tmp_path)
    process = cli(workdir, cache_dir)
    metrics_file = os.path.join(workdir, metrics.METRICS_FILE)
    wait_for(lambda: os.path.exists(metrics_file) and os.path.getsize(metrics_file), process)
    process.send_signal(signal.SIGINT)
    returncode, stderr = finish(process)
    assert returncode == 0, stderr[-3000:]
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    saved = checkpoint.Checkpoints(directory, keep=3, read_only=True).latest_step()
    assert f"stopped by SIGINT at step {saved}" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert saved < NUM_STEPS


def test_second_sigint_gets_the_default_action_back():
    # After the first Ctrl-C the loop saves and stops; a second one must end the process at once,
    # so the handler hands SIGINT back to the default action (terminate) after the first.
    before = signal.getsignal(signal.SIGINT)
    with train._StopSignals() as stop_signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # let the interpreter run the handler
        assert stop_signals.received == "SIGINT" and stop_signals.requested(1)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == before


def test_stop_signal_is_agreed_across_processes_every_few_steps(monkeypatch):
    # With several processes an all-gather per step would stall a pod: the processes agree only
    # every PREEMPTION_SYNC_EVERY steps.
    gathered = []

    def fake_to_host(flags):
        gathered.append(np.asarray(flags).copy())
        return np.concatenate([flags, [False]])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(train.multihost, "to_host", fake_to_host)
    every = train.PREEMPTION_SYNC_EVERY
    stop_signals = train._StopSignals()
    assert not any(stop_signals.requested(step) for step in range(1, 2 * every + 1))
    assert len(gathered) == 2
    stop_signals.received = "SIGTERM"
    stops = [step for step in range(2 * every + 1, 4 * every + 1) if stop_signals.requested(step)]
    assert stops == [3 * every, 4 * every]


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizer_moments_take_their_parameters_sharding(name):
    # Adam's moments are split like their parameter; Adafactor's factored second moments (a
    # row and a column, ranks below the parameter's) and the step counters are replicated
    config = load_config_file("configs/switch.py:tiny")
    config.train.optimizer = name
    mesh = AbstractMesh((2, 2, 2), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    optimizer, _ = optim.make_optimizer(config.train)
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    with jax.sharding.use_abstract_mesh(mesh):
        state, _, _ = train_state.abstract_state(model, config, mesh, optimizer)
    specs = {
        jax.tree_util.keystr(path): (leaf.shape, leaf.sharding.spec)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    }
    experts_wi = {path: v for path, v in specs.items() if "['layers'][1]['ffn']['wi']" in path}
    # per moment, two scanned segments of two layers; Adafactor keeps an unused `v` of size 1
    moments = ["mu", "nu"] if name == "adamw" else ["v", "v_col", "v_row"]
    found = sorted(re.search(r"\.(\w+)\['decoder'\]", path).group(1) for path in experts_wi)
    assert found == sorted(moments * 2)
    expected = PartitionSpec("expert", None, "model") if name == "adamw" else PartitionSpec()
    assert all(spec == expected for _, spec in experts_wi.values()), experts_wi
    assert all(spec == PartitionSpec() for shape, spec in specs.values() if shape == ())

"""`moe_jax.aot`: the training and eval steps compiled by libtpu for TPU slices this host lacks.

The tiny Switch encoder-decoder and GLaM decoder compile with shard_map expert parallelism and
FSDP (`configs.set_fsdp`) for v5e:2x2 (4 chips) and v4:2x2x1 (4 chips of two devices). Oracles:
`count_params` for the memory figures, XLA's own `cost_analysis` for the HLO's matmul FLOPs on
programs without loops, hand-computed FLOPs and run counts for a scanned program, the compiler's
RESOURCE_EXHAUSTED figures for a batch that cannot fit.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from tiny_training import TINY_TRAINING, configured

from configs import set_fsdp
from moe_jax import aot, cli, parallel, tpu_chips
from moe_jax.config import load_config_file
from moe_jax.hlo_stats import _group_size, hlo_stats
from moe_jax.models import count_params

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCH_ENCODER_DECODER = {
    "model__kind": "encoder_decoder",
    "model__num_encoder_layers": 1,
    "model__num_decoder_layers": 1,
    "moe__sparse_every": 1,
    "moe__group_size": 0,  # a group per sequence: the decoder's 8 tokens are no 32-token group
}
# d_model 512 splits into FSDP shards of 128, which XLA:TPU's (8, 128) tiles do not pad
MEDIUM = {"model__d_model": 512, "model__num_heads": 4, "model__head_dim": 128, "model__d_ff": 512}
# (family, topology, mesh expert size, overrides); data is 2 on both slices (v4:2x2x1 has 8
# devices: 4 chips of two)
CASES = [
    ("switch", "v5e:2x2", 2, {}),
    ("glam", "v5e:2x2", 2, MEDIUM),
    ("switch", "v4:2x2x1", 4, {}),
    ("glam", "v4:2x2x1", 4, {}),
]
IDS = [case[:2] for case in CASES]


def _config(family: str, expert: int, **overrides):
    config = load_config_file(f"configs/{family}.py:tiny")
    family_overrides = SWITCH_ENCODER_DECODER if family == "switch" else {}
    config = configured(
        config, TINY_TRAINING, {**family_overrides, "mesh__data": 2, "mesh__expert": expert}
    )
    set_fsdp(config)
    return configured(config, {}, overrides)


@pytest.fixture(scope="module")
def compiled():
    """`{(family, topology): (config, target, train step)}`, each compiled once."""
    steps = {}
    for family, topology, expert, overrides in CASES:
        config = _config(family, expert, **overrides)
        target = aot.prepare(config, topology)
        steps[family, topology] = config, target, aot.compile_train_step(target)
    return steps


@pytest.mark.parametrize("family, topology", IDS)
def test_steps_compile_with_all_to_alls_and_fsdp_all_gathers(compiled, family, topology):
    _, target, step = compiled[family, topology]
    assert step.fits and step.bytes["total"] < target.hbm_bytes
    kinds = {item.kind for item in step.stats.collectives}
    assert {"all-to-all", "all-gather", "all-reduce"} <= kinds, kinds
    # the expert exchange: out and back, forward and backward, over the expert axis (GSPMD's
    # own all-to-alls over all the devices move activations between FSDP and batch layouts)
    exchanges = [
        item
        for item in step.stats.collectives
        if item.kind == "all-to-all" and item.group_size == target.mesh.shape["expert"]
    ]
    assert len(exchanges) >= 4
    if topology == "v5e:2x2":  # there XLA:TPU scatters the FSDP gradients' sums
        assert "reduce-scatter" in kinds


def test_memory_figures_agree_with_the_parameter_count(compiled):
    config, target, step = compiled["glam", "v5e:2x2"]
    # FSDP splits every weight over all the devices (the relative position bias excepted)
    params = count_params(config)["total"] * 4 / target.mesh.size  # float32
    assert step.bytes["params"] == pytest.approx(params, rel=0.01)
    # XLA's arguments: the parameters and AdamW's two moments, plus a batch of 8 x 32 tokens
    assert step.bytes["arguments"] == pytest.approx(3 * params, rel=0.01)
    assert step.bytes["donated"] >= step.bytes["params"] + step.bytes["optimizer"]


def test_matmul_flops_agree_with_xla_and_cover_the_model_flops(compiled):
    _, _, step = compiled["glam", "v5e:2x2"]
    # no loops, so XLA's cost analysis counts everything once, elementwise FLOPs included
    assert not step.stats.loops
    assert 0.95 < step.stats.matmul_flops / step.cost_analysis_flops < 1.0
    # the dispatch and combine einsums and the capacity padding come on top of the model's
    assert 1.0 < step.stats.matmul_flops / step.model_flops < 1.05
    # the encoder-decoder's (cross-attention, two stacks) at d_model 32: dispatch weighs more
    _, _, switch = compiled["switch", "v5e:2x2"]
    assert 1.0 < switch.stats.matmul_flops / switch.model_flops < 1.3


def test_the_report_reads_the_step(compiled):
    config, target, step = compiled["glam", "v5e:2x2"]
    text = aot.format_report("configs/glam.py:tiny", target, step, None)
    assert "train step: fits" in text and "(roofline, not a measurement)" in text
    assert "TPU v5 lite (1 per chip)" in text and "cloud.google.com/tpu/docs/v5e" in text
    assert "data 2 x expert 2 x model 1; batch 8 x 32 tokens (2 rows per batch shard" in text
    figures = aot.report(target, step, None)
    assert figures["fits"] and figures["batch"] == 8 and figures["hbm_bytes"] == target.hbm_bytes
    assert figures["estimated_step_s"] == aot.estimate(step, target)["step_s"] > 0
    json.dumps(figures)  # the --json file's content


def test_dropless_forward_costs_the_active_flops_on_tpu():
    # the forward pass (eval step): ragged dots cost the rows routed, no capacity, no dispatch
    # einsum; groups split over the devices, experts not (4 rows per device)
    config = _config("glam", 1, moe__backend="dropless", mesh__data=4)
    step = aot.compile_eval_step(aot.prepare(config, "v5e:2x2"))
    assert step.fits
    ratio = step.stats.matmul_flops / step.model_flops
    assert 1 / 1.2 < ratio < 1.2, ratio


def test_scanned_loops_count_their_trip_count_times():
    # a shard_map of 5 scanned steps, each [8, 64] @ [64, 32], a psum of that f32[8, 32] over
    # the 4 devices, then [8, 32] @ [32, 64]: 5 x 2 x 2 * 8 * 64 * 32 FLOPs, 5 all-reduces of 1 KiB
    devices = tpu_chips.slice_devices("v5e:2x2")
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))

    def step(x, w, v):
        def body(carry, weights):
            return jax.lax.psum(carry @ weights[0], "x") @ weights[1], None

        return jax.lax.scan(body, x, (w, v))[0]

    replicated = PartitionSpec()
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(replicated,) * 3, out_specs=replicated)
    on_mesh = NamedSharding(mesh, replicated)
    x = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=on_mesh)
    w = jax.ShapeDtypeStruct((5, 64, 32), jnp.float32, sharding=on_mesh)
    v = jax.ShapeDtypeStruct((5, 32, 64), jnp.float32, sharding=on_mesh)
    compiled = jax.jit(sharded).lower(x, w, v).compile()
    stats = hlo_stats(compiled.as_text())
    assert list(stats.loops.values()) == [5] and not stats.unread_loops
    assert stats.matmul_flops == 5 * 2 * 2 * 8 * 64 * 32
    assert compiled.cost_analysis()["flops"] < 2 * 2 * 2 * 8 * 64 * 32  # XLA: the body once
    reduces = [item for item in stats.collectives if item.kind == "all-reduce"]
    assert [(item.count, item.bytes, item.group_size) for item in reduces] == [(5, 8 * 32 * 4, 4)]


def test_hbm_traffic_counts_what_moves_through_hbm():
    # f32[4096, 4096] arrays of 64 MiB: x * 2 + y reads two and writes one (XLA agrees); a
    # scan adding the 6 slices of a stacked f32[6, 4096, 4096] to a carry that stays in VMEM
    # reads each slice once, and moves the carry in and out: 6 x 64 + 64 + 64 MiB
    mesh = jax.sharding.Mesh(np.array(tpu_chips.slice_devices("v5e:2x2")[:1]), ("x",))
    on_device = NamedSharding(mesh, PartitionSpec())
    x = jax.ShapeDtypeStruct((4096, 4096), jnp.float32, sharding=on_device)
    stacked = jax.ShapeDtypeStruct((6, 4096, 4096), jnp.float32, sharding=on_device)
    mib = 1 << 20
    compiled = jax.jit(lambda x, y: x * 2 + y).lower(x, x).compile()
    assert hlo_stats(compiled.as_text()).memory_bytes == 3 * 64 * mib
    assert compiled.cost_analysis()["bytes accessed"] == 3 * 64 * mib

    def add_slices(carry, slices):
        return jax.lax.scan(lambda c, s: (c + s, None), carry, slices)[0]

    scanned = jax.jit(add_slices).lower(x, stacked).compile()
    stats = hlo_stats(scanned.as_text())
    assert list(stats.loops.values()) == [6]
    assert stats.memory_bytes == pytest.approx((6 + 2) * 64 * mib, rel=1e-6)


@pytest.mark.parametrize(
    "attributes, group_size",
    [
        ("replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true", 2),
        ("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={2}", 2),
        ("replica_groups=mesh['axis_0'=4,'axis_1'=2,'axis_2'=1] {'axis_0','axis_2'}, ", 4),
        (
            "replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=1,'axis_3'=4], "
            "device_ids=([4,4]T(1,0)) {'axis_1','axis_3'}, dimensions={1}",
            16,
        ),  # fmt: skip
        ("replica_groups={}, dimensions={0}", 16),  # one group of all 16 partitions
        ("source_target_pairs={{0,1},{1,2},{2,3},{3,0}}", 2),
    ],
)
def test_group_sizes_of_the_replica_group_forms_xla_tpu_writes(attributes, group_size):
    assert _group_size(attributes, 16) == group_size


def test_out_of_memory_figures_are_read_from_the_compiler_message():
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (22.05G) exceeds available HBM (15.75G)."
    )
    assert tpu_chips.out_of_memory(message) == (
        int(22.05 * tpu_chips.GIB),
        int(15.75 * tpu_chips.GIB),
    )
    assert tpu_chips.out_of_memory("INTERNAL: something else") is None


@pytest.mark.parametrize("chip", tpu_chips.CHIPS, ids=lambda chip: chip.name)
def test_every_chip_of_the_table_has_a_slice_libtpu_accepts(chip):
    devices = tpu_chips.slice_devices(chip.example)
    assert tpu_chips.chip_of(devices[0]) == chip
    share = tpu_chips.devices_per_chip(devices)
    assert share == (2 if chip.name in ("v2", "v3", "v4") else 1)
    # XLA keeps a little of each device's HBM for itself
    available = tpu_chips.available_hbm(devices[0]) / tpu_chips.GIB
    assert 0.9 * chip.hbm_gib / share < available < chip.hbm_gib / share


@pytest.mark.parametrize(
    "topology, sizes", [("v5p:4x4x4", (8, 8, 1)), ("v4:2x2x1", (2, 4, 1)), ("v3:2x2", (2, 4, 1))]
)
def test_meshes_lay_out_on_tpu_slices(topology, sizes):
    # data 8 x expert 8 needs the 4x4x4 torus's axes split; libtpu's v4 chips are two devices
    # each, which jax's layouts refuse; v3's two cores per chip jax lays out itself
    devices = tpu_chips.slice_devices(topology)
    mesh = parallel.make_mesh(*sizes, devices=devices)
    assert tuple(mesh.shape.values()) == sizes
    assert sorted(device.id for device in mesh.devices.flat) == sorted(d.id for d in devices)


def _aot(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "moe_jax.aot", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_an_unknown_topology_is_a_one_line_error_naming_the_known_ones():
    # (FSDP's rule parses from the command line: the run gets as far as the topology)
    fsdp = "--config.mesh.rules.embed=('data', 'expert')"
    result = _aot("--config=configs/glam.py:tiny", fsdp, "--topology=v7:2x2x1")
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("moe_jax.aot")]
    assert error == [
        "moe_jax.aot: --topology=v7:2x2x1: libtpu does not know it (Invalid TPU external name: "
        "TPU v7); it knows CHIP:SHAPE slices of v2, v3, v4, v5e, v5p, v6e, e.g. v2:2x2, "
        "v3:4x4, v4:2x2x1, v5e:4x4, v5p:2x2x1, v6e:8x8."
    ]
    assert "Traceback" not in result.stderr


def test_an_oversized_batch_does_not_fit_and_says_by_how_much(tmp_path):
    figures = tmp_path / "aot.json"
    settings = [f"--config.{key}={value}" for key, value in TINY_TRAINING.items()]
    settings = [s for s in settings if not s.startswith("--config.mesh.data")]
    result = _aot(
        "--config=configs/glam.py:tiny",
        "--topology=v5e:2x2",
        *settings,
        "--config.mesh.data=4",
        "--batch=262144",
        "--eval_step=false",
        f"--json={figures}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(figures.read_text())
    assert not written["fits"] and written["batch"] == 262144
    needed, available = written["bytes"]["total"], written["hbm_bytes"]
    assert needed > available == int(15.75 * tpu_chips.GIB)
    assert (
        f"train step: does not fit: needs {needed / tpu_chips.GIB:.2f} GiB of 15.75 GiB"
        in result.stdout
    )


def test_commands_choose_the_cpu_on_a_host_without_an_accelerator():
    # libtpu (the test extra) would otherwise load itself and look for a TPU, with warnings
    code = (
        "from moe_jax import cli; chosen = cli.use_cpu_without_accelerator(); import jax; "
        "print(chosen, jax.default_backend(), len(jax.devices()))"
    )
    environment = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120
    )
    accelerator = any(map(os.path.exists, cli.ACCELERATOR_DEVICE_FILES))
    if accelerator:
        assert result.stdout.split()[0] == "False"
    else:
        assert result.stdout.split() == ["True", "cpu", "8"]  # the suite's 8 host devices
        assert "TPU" not in result.stderr, result.stderr


def test_the_largest_batch_is_searched_in_whole_units(compiled, monkeypatch):
    # the search over a step that fits up to 44 rows: units of 4 (the batch shards; groups of
    # one 32-token row), doubling from train.batch_size 8 to 64, then bisecting to 44
    _, target, step = compiled["glam", "v5e:2x2"]
    assert aot.batch_unit(target) == 4
    tried = []

    def compile_train_step(candidate):
        batch = candidate.config.train.batch_size
        return step._replace(fits=batch <= 44)

    monkeypatch.setattr(aot, "compile_train_step", compile_train_step)
    found, found_step = aot.largest_batch(target, lambda batch, step: tried.append(batch))
    assert found.config.train.batch_size == 44 and found_step.fits
    assert tried == [8, 16, 32, 64, 48, 40, 44]

"""Before you book a TPU: compile a run's steps for a TPU slice on this host, and read whether
they fit, what they compute and communicate, and a roofline estimate of the step time.

    python -m moe_jax.aot --config=configs/glam.py:0.1b_64e --topology=v5e:4x4 \\
        --config.mesh.data=4 --config.mesh.expert=4 --config.train.batch_size=16

The training step `moe_jax.train` runs (`train_state.jit_train_step`: the same function,
shardings, optimizer and donation) and the eval step are lowered with abstract inputs on the
mesh of `config.mesh` laid over the slice's compile-only devices (`tpu_chips.slice_devices`)
and compiled by libtpu's compiler. No device of the slice is needed and nothing is allocated.
Batches take their shapes from `train.batch_size`, `train.seq_len` and the span-corruption
lengths; the dataset is not read (the synthetic corpus stands in for it).

Per device: the bytes of the parameters and optimizer state (from their shardings), XLA's
temporaries, and the total (arguments + outputs - donated + temporaries) against the HBM XLA
makes available (`tpu_chips.available_hbm`); "fits" when the compiler accepts the program, and
"does not fit: needs X GiB of Y GiB" (its RESOURCE_EXHAUSTED figures) when it refuses it.
FLOPs: the matmul FLOPs of the optimized HLO with loop bodies counted their trip count times
(`hlo_stats`), against the model FLOPs of `moe_jax.flops` (3 x the forward pass's active
matmuls, PaLM's 6N + 12LHQT); XLA's `cost_analysis` FLOPs count each loop body once and are
shown for reference. Collectives: every one of the optimized HLO, grouped by kind, bytes and
group size, with its runs per step. The estimate is a roofline, not a measurement: the matmul
FLOPs at the chip's bf16 peak or the HBM traffic (operands and results of the unfused
instructions) at its HBM bandwidth, whichever takes longer, plus the collectives' traffic at its
ICI bandwidth with no overlap (a ring moves (g - 1) / g of the bytes through each device, twice
for an all-reduce); MFU is the model FLOPs over that time at the peak. The chips' figures and
their sources are in `moe_jax.tpu_chips`.

`--batch=max` searches the largest global batch (a multiple of the batch shards, in whole
routing groups) whose training step fits, compiling the training step once per candidate;
`--batch=N` sets `train.batch_size`. `--json=FILE` writes the figures, per device unless a key
says otherwise; `--hlo_dir=DIR` the steps' optimized HLO (`train_step.hlo.txt`,
`eval_step.hlo.txt`).
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from typing import Any, NamedTuple

import jax
from absl import app, flags
from ml_collections import config_flags

from moe_jax import cli, data, flops, optim, parallel, run_identity, tpu_chips, train_state
from moe_jax.config import DECODER_KINDS
from moe_jax.hlo_stats import HloStats, hlo_stats


class Target(NamedTuple):
    """A config laid over a slice: everything its steps are compiled from."""

    config: Any  # resolved; the synthetic corpus stands in for the data
    topology: str
    chip: tpu_chips.Chip
    devices_per_chip: int
    hbm_bytes: int  # HBM XLA makes available to a program, per device
    mesh: Any
    optimizer: Any
    schedule: Any
    state: Any  # the abstract TrainState with its shardings
    graphdef: Any
    rng_state: Any


class Step(NamedTuple):
    """One compiled (or refused) step, per device."""

    fits: bool
    compile_s: float
    bytes: dict[str, int | None]  # params, optimizer, temporaries, total, ...
    stats: HloStats | None  # None when it does not fit
    cost_analysis_flops: float | None
    model_flops: float  # moe_jax.flops, per device
    hlo: str | None  # the optimized HLO text (None when it does not fit)


# ------------------------------------------------------------------------------ compiling


def prepare(config, topology: str) -> Target:
    """Every check of `config` on `topology` that can fail before compiling (ValueError)."""
    config = config.copy_and_resolve_references()
    config.data.name = "synthetic"  # batch shapes depend on the lengths only
    config = run_identity.resolve(config)
    train_state.check_config(config)
    devices = tpu_chips.slice_devices(topology)
    try:
        mesh = parallel.mesh_from_config(config, devices=devices)
    except ValueError as error:
        raise ValueError(f"--topology={topology} has {len(devices)} devices: {error}") from None
    model = train_state.abstract_model(config)
    train_state.check_divisible(model, mesh, config.mesh.rules)
    optimizer, schedule = optim.make_optimizer(config.train)
    state, graphdef, rng_state = train_state.abstract_state(model, config, mesh, optimizer)
    return Target(
        config,
        topology,
        tpu_chips.chip_of(devices[0]),
        tpu_chips.devices_per_chip(devices),
        tpu_chips.available_hbm(devices[0]),
        mesh,
        optimizer,
        schedule,
        state,
        graphdef,
        rng_state,
    )


def with_batch(target: Target, batch_size: int) -> Target:
    """`target` with `train.batch_size` set (the model and its state do not depend on it)."""
    config = target.config.copy_and_resolve_references()
    config.train.batch_size = batch_size
    return target._replace(config=config)


def batch_spec(target: Target, split: str) -> dict:
    """`{key: (shape, dtype)}` of a global batch of `split`, after the checks that it splits
    over the mesh in whole routing groups."""
    config, mesh = target.config, target.mesh
    try:
        parallel.check_batch(config.train.batch_size, mesh, config.mesh.rules)
    except ValueError as error:
        raise ValueError(f"train.batch_size={config.train.batch_size}: {error}") from None
    spec = data.dataset_from_config(config, split).element_spec
    train_state.check_groups(config, mesh, spec)
    return spec


def model_flops(config, spec: dict, *, train: bool) -> float:
    """`moe_jax.flops` of a step on a batch of `spec` (all devices together)."""
    if config.model.kind in DECODER_KINDS:
        rows, length = spec["inputs"][0]
        lengths = {"length": length}
    else:
        rows, length = spec["decoder_inputs"][0]
        lengths = {"length": length, "encoder_length": spec["encoder_inputs"][0][1]}
    count = flops.train_flops if train else flops.forward_flops
    return count(config, batch_size=rows, **lengths)


def _shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `jax.ShapeDtypeStruct`s."""
    return sum(
        leaf.dtype.itemsize * math.prod(leaf.sharding.shard_shape(leaf.shape))
        for leaf in jax.tree.leaves(tree)
    )


def _compile(target: Target, jitted, args: tuple, train: bool, spec: dict) -> Step:
    state = target.state
    known = {"params": _shard_bytes(state.params), "optimizer": _shard_bytes(state.opt_state)}
    per_device = model_flops(target.config, spec, train=train) / target.mesh.size
    start = time.perf_counter()
    try:
        with jax.set_mesh(target.mesh):
            compiled = jitted.lower(*args).compile()
    except jax.errors.JaxRuntimeError as error:
        sizes = tpu_chips.out_of_memory(str(error))
        if sizes is None:
            raise ValueError(f"XLA:TPU refused the program: {str(error).splitlines()[0]}") from None
        figures = {**known, "temporaries": None, "total": sizes[0]}
        return Step(False, time.perf_counter() - start, figures, None, None, per_device, None)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    figures = {
        **known,
        "temporaries": memory.temp_size_in_bytes,
        "total": total,
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "donated": memory.alias_size_in_bytes,
        "code": memory.generated_code_size_in_bytes,
    }
    cost = compiled.cost_analysis()
    text = compiled.as_text()
    return Step(True, seconds, figures, hlo_stats(text), float(cost["flops"]), per_device, text)


def _abstract_batch(target: Target, spec: dict) -> dict:
    rules = target.config.mesh.rules
    return {
        key: jax.ShapeDtypeStruct(
            shape, dtype, sharding=parallel.batch_sharding(target.mesh, rules, len(shape))
        )
        for key, (shape, dtype) in spec.items()
    }


def compile_train_step(target: Target) -> Step:
    """The training step of `moe_jax.train`, compiled for the slice."""
    spec = batch_spec(target, "train")
    shardings = jax.tree.map(lambda leaf: leaf.sharding, target.state)
    jitted = train_state.jit_train_step(
        target.graphdef,
        target.rng_state,
        target.optimizer,
        target.schedule,
        target.config,
        target.mesh,
        shardings,
        spec,
    )
    key = jax.eval_shape(jax.random.key, 0)
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=train_state.replicated(target.mesh))
    args = (target.state, _abstract_batch(target, spec), rng, None)
    return _compile(target, jitted, args, True, spec)


def compile_eval_step(target: Target) -> Step:
    """The eval step of `moe_jax.train`, compiled for the slice."""
    spec = batch_spec(target, "validation")
    shardings = jax.tree.map(lambda leaf: leaf.sharding, target.state)
    jitted = train_state.jit_eval_step(
        target.graphdef, target.rng_state, target.config, target.mesh, shardings, spec
    )
    return _compile(target, jitted, (target.state, _abstract_batch(target, spec)), False, spec)


def batch_unit(target: Target) -> int:
    """The step of global batch sizes that split over the batch shards in whole groups."""
    config = target.config
    shards = parallel.batch_shards(target.mesh, config.mesh.rules)
    group = config.moe.group_size if config.moe.num_experts else 0
    rows = 1
    if group and shards > 1:
        spec = data.dataset_from_config(with_batch(target, shards).config, "train").element_spec
        for key, (shape, _) in spec.items():
            if key.endswith("inputs"):
                rows = math.lcm(rows, group // math.gcd(group, shape[1]))
    return shards * rows


def largest_batch(target: Target, log) -> tuple[Target, Step] | None:
    """The largest global batch whose training step fits (a multiple of `batch_unit`), with its
    compiled step; None when not even one unit fits. `log(batch, step)` sees every candidate."""
    unit = batch_unit(target)

    def probe(batch: int) -> Step:
        step = compile_train_step(with_batch(target, batch))
        log(batch, step)
        return step

    batch = max(unit, target.config.train.batch_size // unit * unit)
    step = probe(batch)
    best = (batch, step) if step.fits else None
    failed = None if step.fits else batch
    while best is None and batch > unit:  # halve until one fits
        failed, batch = batch, max(unit, batch // 2 // unit * unit)
        step = probe(batch)
        best = (batch, step) if step.fits else None
    if best is None:
        return None
    while failed is None:  # double until one does not fit
        batch = best[0] * 2
        step = probe(batch)
        if step.fits:
            best = (batch, step)
        else:
            failed = batch
    while failed - best[0] > unit:  # bisect
        batch = (best[0] + failed) // 2 // unit * unit
        step = probe(batch)
        if step.fits:
            best = (batch, step)
        else:
            failed = batch
    return with_batch(target, best[0]), best[1]


# ------------------------------------------------------------------------------ reporting

_RING_FACTOR = {"all-reduce": 2.0}  # bytes through each device per byte, times (g - 1) / g


def collective_rows(stats: HloStats) -> list[dict]:
    """The collectives grouped by (kind, bytes, group size): ops, runs per step, bytes per step;
    largest traffic first."""
    groups: dict[tuple, list] = collections.defaultdict(lambda: [0, 0])
    for item in stats.collectives:
        key = (item.kind, item.bytes, item.group_size)
        groups[key][0] += 1
        groups[key][1] += item.count
    rows = [
        {"kind": kind, "bytes": size, "group_size": group, "ops": ops, "runs": runs}
        for (kind, size, group), (ops, runs) in groups.items()
    ]
    return sorted(rows, key=lambda row: -row["bytes"] * row["runs"])


def estimate(step: Step, target: Target) -> dict[str, float]:
    """The roofline estimate of a compiled step (see the module docstring), in seconds."""
    chip, share = target.chip, target.devices_per_chip
    peak = chip.bf16_tflops * 1e12 / share
    compute = step.stats.matmul_flops / peak
    memory = step.stats.memory_bytes / (chip.hbm_gbps * 1e9 / share)
    traffic = sum(
        item.count
        * item.bytes
        * _RING_FACTOR.get(item.kind, 1.0)
        * ((item.group_size - 1) / item.group_size if item.kind != "collective-permute" else 1)
        for item in step.stats.collectives
    )
    communication = traffic / (chip.ici_gbps * 1e9 / share)
    seconds = max(compute, memory) + communication
    return {
        "compute_s": compute,
        "memory_s": memory,
        "collectives_s": communication,
        "step_s": seconds,
        "mfu": step.model_flops / (seconds * peak) if seconds else 0.0,
    }


def step_report(step: Step, target: Target) -> dict:
    """The JSON figures of one step (per device)."""
    figures = {
        "fits": step.fits,
        "compile_s": step.compile_s,
        "bytes": step.bytes,
        "model_flops": step.model_flops,
    }
    if not step.fits:
        return figures
    rough = estimate(step, target)
    return {
        **figures,
        "xla_flops": step.stats.matmul_flops,
        "xla_cost_analysis_flops": step.cost_analysis_flops,
        "hbm_traffic_bytes": step.stats.memory_bytes,
        "collectives": [item._asdict() for item in step.stats.collectives],
        "loops": step.stats.loops,
        "estimated_step_s": rough["step_s"],
        "estimate": rough,
    }


def report(target: Target, train: Step, evaluation: Step | None) -> dict:
    """`--json`'s figures: the training step's at the top level (per device), the eval step's
    under 'eval', the slice's and the batch's (global) facts."""
    chip = target.chip
    return {
        **step_report(train, target),
        "hbm_bytes": target.hbm_bytes,
        "batch": target.config.train.batch_size,
        "topology": target.topology,
        "devices": target.mesh.size,
        "mesh": dict(target.mesh.shape),
        "chip": {**chip._asdict(), "devices_per_chip": target.devices_per_chip},
        "eval": None if evaluation is None else step_report(evaluation, target),
    }


def _size(count: float | None) -> str:
    if count is None:
        return "?"
    if count >= tpu_chips.GIB:
        return f"{count / tpu_chips.GIB:.2f} GiB"
    if count >= 1 << 20:
        return f"{count / (1 << 20):.1f} MiB"
    return f"{count / 1024:.1f} KiB" if count >= 1024 else f"{count:.0f} B"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.2f} s"


def format_step(name: str, step: Step, target: Target) -> list[str]:
    """The lines of one step's report."""
    hbm = target.hbm_bytes
    if not step.fits:
        return [
            f"{name}: does not fit: needs {_size(step.bytes['total'])} of {_size(hbm)} "
            f"(XLA's HLO temporaries; refused in {step.compile_s:.1f} s); parameters "
            f"{_size(step.bytes['params'])}, optimizer state {_size(step.bytes['optimizer'])}"
        ]
    figures, stats = step.bytes, step.stats
    lines = [
        f"{name}: fits (compiled in {step.compile_s:.1f} s)",
        f"  memory       parameters {_size(figures['params'])} | optimizer state "
        f"{_size(figures['optimizer'])} | temporaries {_size(figures['temporaries'])} | total "
        f"{_size(figures['total'])} of {_size(hbm)} ({figures['total'] / hbm:.0%})",
        f"  FLOPs        XLA {stats.matmul_flops:.3e} (matmuls of the optimized HLO, loops x trip "
        f"counts; cost_analysis {step.cost_analysis_flops:.3e}) | model {step.model_flops:.3e} "
        f"(moe_jax.flops) | XLA / model {stats.matmul_flops / step.model_flops:.2f}",
        "  collectives  kind                 group  bytes each   ops  runs/step  bytes/step",
    ]
    for row in collective_rows(stats):
        lines.append(
            f"               {row['kind']:<20} {row['group_size']:>5}  {_size(row['bytes']):>10}"
            f"  {row['ops']:>4}  {row['runs']:>9}  {_size(row['bytes'] * row['runs']):>10}"
        )
    if not stats.collectives:
        lines[-1] = "  collectives  none"
    if stats.unread_loops:
        lines.append(f"  loops        trip counts unread, counted once: {stats.unread_loops}")
    rough = estimate(step, target)
    lines.append(
        f"  estimate     (roofline, not a measurement) step {_seconds(rough['step_s'])} = "
        f"max(compute {_seconds(rough['compute_s'])}, HBM {_seconds(rough['memory_s'])}) + "
        f"collectives {_seconds(rough['collectives_s'])}; MFU {rough['mfu']:.0%} of the bf16 peak"
    )
    return lines


def format_report(spec: str, target: Target, train: Step, evaluation: Step | None) -> str:
    """The text `python -m moe_jax.aot` prints."""
    chip, config, mesh = target.chip, target.config, target.mesh
    share = target.devices_per_chip
    rows = config.train.batch_size
    shards = parallel.batch_shards(mesh, config.mesh.rules)
    sizes = " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items())
    lines = [
        f"moe_jax.aot: {spec} on {target.topology}, compiled on this host by libtpu; figures "
        "per device",
        f"slice   {mesh.size} devices of {chip.device_kind} ({share} per chip), "
        f"{_size(target.hbm_bytes)} HBM available to XLA per device",
        f"mesh    {sizes}; batch {rows} x {config.train.seq_len} tokens ({rows // shards} "
        f"row{'s' if rows // shards > 1 else ''} per batch shard, {shards} shards); dtype "
        f"{config.model.dtype}",
        *format_step("train step", train, target),
    ]
    if evaluation is not None:
        lines += format_step("eval step", evaluation, target)
    lines.append(
        f"chip    {chip.name}: {chip.bf16_tflops:g} TFLOP/s bf16, {chip.hbm_gib:g} GiB HBM at "
        f"{chip.hbm_gbps:g} GB/s, ICI {chip.ici_gbps:g} GB/s per chip ({chip.source})"
    )
    return "\n".join(lines)


# -------------------------------------------------------------------------------- the CLI


def _define_flags():
    config = config_flags.DEFINE_config_file(
        "config", None, "Config file and variant, e.g. configs/glam.py:0.1b_64e."
    )
    flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:4x4 or v4:2x2x1.")
    flags.DEFINE_string("batch", "", "Global batch: N, or 'max' for the largest that fits.")
    flags.DEFINE_string("json", None, "Write the figures to this JSON file.")
    flags.DEFINE_string("hlo_dir", None, "Write the steps' optimized HLO text into this folder.")
    flags.DEFINE_bool("eval_step", True, "Compile the eval step too.")
    flags.mark_flags_as_required(["config", "topology"])
    return config


def run(config, options, spec: str) -> str:
    """Compile, report and (with `--json`) write; returns the report's text."""
    target = prepare(config, options.topology)
    if options.batch == "max":

        def log(batch, step):
            verdict = "fits" if step.fits else f"does not fit ({_size(step.bytes['total'])})"
            print(f"moe_jax.aot: batch {batch}: {verdict}", file=sys.stderr)

        found = largest_batch(target, log)
        if found is None:
            raise ValueError(
                f"not even a batch of {batch_unit(target)} fits on {options.topology}; use a "
                "larger slice, more expert or model shards, or FSDP rules (README)."
            )
        target, train = found
    else:
        if options.batch:
            if not options.batch.isdigit() or int(options.batch) < 1:
                raise ValueError(f"--batch={options.batch}: give a number >= 1 or 'max'.")
            target = with_batch(target, int(options.batch))
        train = compile_train_step(target)
    evaluation = compile_eval_step(target) if options.eval_step else None
    if options.hlo_dir:
        os.makedirs(options.hlo_dir, exist_ok=True)
        for name, step in (("train_step", train), ("eval_step", evaluation)):
            if step is not None and step.hlo is not None:
                with open(os.path.join(options.hlo_dir, f"{name}.hlo.txt"), "w") as file:
                    file.write(step.hlo)
    if options.json:
        with open(options.json, "w", encoding="utf-8") as file:
            json.dump(report(target, train, evaluation), file, indent=2)
    return format_report(spec, target, train, evaluation)


def main(argv: list[str], config_flag) -> int:
    options = cli.flag_values(argv)
    spec = config_flags.get_config_filename(options["config"])
    try:
        print(run(config_flag.value, options, spec))
    except ValueError as error:
        sys.stderr.write(f"moe_jax.aot: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    _config_flag = _define_flags()
    app.run(lambda argv: main(argv, _config_flag), flags_parser=cli.parse_flags)

"""Training: setup, the loop, checkpoints and metrics, and `python -m moe_jax.train`.

    python -m moe_jax.train --config=configs/switch.py:tiny --workdir=runs/switch_tiny \\
        --config.train.num_steps=200 --config.mesh.data=2 --config.mesh.expert=4

The workdir receives `config.json` (the resolved config), `run_history.jsonl`, `metrics.jsonl`
and TensorBoard files (`moe_jax.metrics`), and `checkpoints/` (`moe_jax.checkpoint`). Running
the same command again resumes from the latest checkpoint; raise `train.num_steps` to train
further (the schedule keeps its horizon; what a resume may change is in `moe_jax.run_identity`).
A new run starts from random weights, or from a Hugging Face checkpoint with
`--config.train.init_from=hf:DIR` (`moe_jax.hf`; `--config=configs/hf.py:DIR` sets it with the
checkpoint's architecture); DIR is read only while the workdir holds no checkpoint (a resume
takes the weights from its checkpoint). With `config.distill.teacher` set (`moe_jax.distill`),
the latest checkpoint of that run is restored, replicated over the mesh, and each train step
adds its soft targets to the loss (`moe_jax.steps.compute_loss`). Every check of the config,
mesh, parameter shardings, workdir, data, teacher and existing checkpoints (their run identity,
and that the latest one is readable) runs before anything is written.

Exact resume: a batch is a pure function of (seed, split, step) (`moe_jax.data`) and the dropout
and router-jitter keys of step s are `fold_in(key(seed), s)` (`moe_jax.steps`), so a run resumed
from the checkpoint of step s computes the same losses as an uninterrupted run (bit for bit on
the same devices). SIGTERM (TPU/GCE preemption) and SIGINT (Ctrl-C) save a checkpoint and exit
0; a second SIGINT ends the process at once. A non-finite loss,
gradient norm or parameter norm stops the run with `TrainingDiverged`; it is checked before each
checkpoint, so the checkpoints on disk are always finite.

The loss and the train and eval steps are in `moe_jax.steps`; the state (abstract model,
shardings, optimizer state), the checks of a config on a mesh and the steps' jitted forms, which
`moe_jax.aot` compiles for TPU slices, are in `moe_jax.train_state`.

Multi-host: `jax.distributed` starts when `--coordinator_address` (with `--num_processes` and
`--process_id`) is given, or when a cluster is detected from its environment (a multi-worker
Cloud TPU slice: `TPU_WORKER_HOSTNAMES` or `MEGASCALE_COORDINATOR_ADDRESS`; SLURM with
`SLURM_NTASKS > 1`; Open MPI with `OMPI_COMM_WORLD_SIZE > 1`), in which case JAX finds the
arguments itself. Every process runs the same command; each loads its share of the batch.
"""

import functools
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from moe_jax import (
    checkpoint,
    cli,
    data,
    hf,
    metrics,
    multihost,
    optim,
    parallel,
    run_identity,
    train_state,
)
from moe_jax.config import EVAL_FULL_PASS
from moe_jax.steps import TrainState
from moe_jax.train_state import config_from_workdir, restore_for_inference


class TrainingDiverged(RuntimeError):
    """The loss, gradient norm or parameter norm became NaN or infinite."""


# ------------------------------------------------------------------------------ setup


class SetupError(ValueError):
    """A bad config, mesh, dataset or workdir, found before anything is written."""


class RunResult(NamedTuple):
    step: int  # updates applied when the run ended
    preempted: bool  # stopped by SIGTERM or SIGINT (a checkpoint of `step` was saved)
    state: TrainState  # the final state (sharded arrays)
    stopped_by: str | None = None  # 'SIGTERM' | 'SIGINT' when preempted


def _make_mesh(config, devices):
    """The mesh of `config.mesh`; on too few devices, says how to get more on a CPU."""
    try:
        return parallel.mesh_from_config(config, devices=devices)
    except ValueError as error:
        available = len(jax.devices() if devices is None else devices)
        needed = int(np.prod([max(config.mesh[axis], 1) for axis in ("data", "expert", "model")]))
        if needed > available and jax.default_backend() == "cpu":
            raise ValueError(
                f"{error} On a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={needed} "
                "(set before Python starts) gives that many host devices."
            ) from error
        raise


def _check_workdir(workdir: str) -> None:
    """The workdir and its checkpoints directory are directories (or absent) and writable."""
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    for path in (workdir, directory):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(
                f"{path} is a file, not a directory: checkpoints could not be saved there; move "
                "it away or choose another --workdir."
            )
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{existing} is not writable: choose a --workdir you can write to.")


def _newest_readable_before(checkpoints: checkpoint.Checkpoints, step: int) -> int | None:
    """The newest step older than `step` whose identity can be read, or None."""
    for older in sorted((s for s in checkpoints.all_steps() if s < step), reverse=True):
        try:
            checkpoints.read_identity(older)
        except checkpoint.UnreadableCheckpoint:
            continue
        return older
    return None


def _unreadable(
    error: checkpoint.UnreadableCheckpoint, checkpoints: checkpoint.Checkpoints, workdir: str
) -> SetupError:
    """The refusal for an unreadable latest step, with the command that resumes from the newest
    readable one."""
    readable = _newest_readable_before(checkpoints, error.step)
    aside = os.path.join(workdir, f"unreadable_checkpoint_{error.step}")
    move = f"mv {checkpoints.step_path(error.step)} {aside}"
    if readable is None:
        advice = (
            f"No older checkpoint is readable; move it away ({move}) to start afresh in this "
            "workdir, or use a new --workdir."
        )
    else:
        advice = (
            f"The newest readable checkpoint is step {readable}; to resume from it, move the "
            f"unreadable step aside and run the same command again:\n  {move}"
        )
    return SetupError(f"{error}.\n{advice}")


def _check_teacher(config, workdir: str) -> None:
    """A `distill.teacher` is another run's workdir, with a checkpoint, whose model reads the
    same batches and predicts the same vocabulary."""
    teacher = config.distill.teacher
    if not teacher:
        return
    if os.path.abspath(teacher) == workdir:
        raise ValueError(
            f"distill.teacher={teacher} is the student's own --workdir; give the teacher's."
        )
    try:
        teacher_config = config_from_workdir(teacher)
    except FileNotFoundError as error:
        raise ValueError(f"distill.teacher={teacher}: {error}") from None
    directory = os.path.join(teacher, checkpoint.CHECKPOINT_DIR)
    existing = checkpoint.Checkpoints(directory, keep=1, read_only=True)
    latest = existing.latest_step() if os.path.isdir(directory) else None
    existing.close()
    if latest is None:
        raise ValueError(
            f"distill.teacher={teacher} holds no checkpoint in {directory}; train the teacher "
            "first."
        )
    for key in ("kind", "vocab_size"):
        if teacher_config.model[key] != config.model[key]:
            raise ValueError(
                f"the teacher {teacher} has model.{key}={teacher_config.model[key]!r} but the "
                f"student has {config.model[key]!r}; set --config.model.{key}="
                f"{teacher_config.model[key]!r}."
            )


def _load_teacher(teacher_workdir: str, mesh) -> tuple[tuple[nnx.GraphDef, Any], nnx.State]:
    """`((graphdef, config), state)` of the latest checkpoint of the teacher run, its state
    replicated over `mesh`."""
    teacher_config, teacher_model, _ = restore_for_inference(teacher_workdir)
    graphdef, teacher_state = nnx.split(teacher_model)
    teacher_state = jax.device_put(teacher_state, train_state.replicated(mesh))
    return (graphdef, teacher_config), teacher_state


class _Prepared(NamedTuple):
    config: ml_collections.ConfigDict  # resolved (`run_identity.resolve`)
    mesh: Any
    train_data: data.Dataset
    eval_data: data.Dataset | None
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    signature: dict
    target: TrainState  # the abstract state with its shardings (`train_state.abstract_state`)
    graphdef: nnx.GraphDef
    rng_state: nnx.State
    resume_step: int | None  # the latest checkpoint's step, None for a fresh run
    changes: dict  # {key: (stored, now)} that a resume changes (all allowed)


def _prepare(config, workdir: str, devices) -> _Prepared:
    """Every check that can fail, in order, before the workdir is touched."""
    requested_horizon = config.train.schedule_steps
    config = run_identity.resolve(config)
    train_state.check_config(config)
    _check_workdir(workdir)
    _check_teacher(config, workdir)
    mesh = _make_mesh(config, devices)
    try:
        parallel.check_batch(config.train.batch_size, mesh, config.mesh.rules)
    except ValueError as error:
        raise ValueError(f"train.batch_size={config.train.batch_size}: {error}") from error
    shares = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    train_data = data.dataset_from_config(config, "train", **shares)
    eval_data = None
    if config.train.eval_every:
        eval_data = data.dataset_from_config(config, "validation", **shares)
        if config.train.eval_steps == EVAL_FULL_PASS:
            eval_data.full_pass()  # raises for a split with no end (the synthetic corpus)
    train_state.check_groups(config, mesh, train_data.element_spec)
    abstract_model = train_state.abstract_model(config)
    train_state.check_divisible(abstract_model, mesh, config.mesh.rules)
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    stored, resume_step = None, None
    if os.path.isdir(directory):
        existing = checkpoint.Checkpoints(directory, keep=1, read_only=True)
        resume_step = existing.latest_step()
        if resume_step is not None:
            try:
                stored = existing.read_identity(resume_step)
            except checkpoint.UnreadableCheckpoint as error:
                raise _unreadable(error, existing, workdir) from None
            config = run_identity.keep_stored_horizon(config, requested_horizon, stored)
        existing.close()
    if resume_step is None:
        hf.init_from(config)  # checks a train.init_from checkpoint against the config
    # the optimizer and schedule checks come last: a warmup longer than a short trial's
    # num_steps must not hide the error of the setting being tried, and a resume's horizon
    # is the stored one (keep_stored_horizon above)
    optimizer, schedule = optim.make_optimizer(config.train)
    # the shardings of the abstract state are the canonical ones: fresh and resumed runs
    # compile the same step (and share a persistent compilation cache)
    target, graphdef, rng_state = train_state.abstract_state(
        abstract_model, config, mesh, optimizer
    )
    signature = checkpoint.make_signature(config, target)
    changes = {}
    if stored is not None:
        changes = run_identity.check_resume(stored, signature, resume_step, directory)
    return _Prepared(
        config,
        mesh,
        train_data,
        eval_data,
        optimizer,
        schedule,
        signature,
        target,
        graphdef,
        rng_state,
        resume_step,
        changes,
    )


# ------------------------------------------------------------------------------- the loop


PREEMPTION_SYNC_EVERY = 10  # steps between the processes' agreements on a stop signal


class _StopSignals:
    """Notes SIGTERM (preemption) and SIGINT (Ctrl-C): the loop saves and stops.

    After the first SIGINT, Ctrl-C gets its default action back, so a second one ends the
    process at once (no save). `requested(step)` is this process's flag on one process; with
    several, they agree by an all-gather every `PREEMPTION_SYNC_EVERY` steps only (an
    all-gather per step would stall a pod), so a stop lands on a multiple of it. (Orbax's
    `reached_preemption` reads JAX's distributed preemption service, which a single process
    without `jax.distributed` lacks, and knows nothing of SIGINT.)
    """

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        self.received = self.received or name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            sys.stderr.write(
                "\nmoe_jax.train: SIGINT: saving a checkpoint after this step, then stopping; "
                "press Ctrl-C again to abort without saving.\n"
            )

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.received is not None
        if step % PREEMPTION_SYNC_EVERY:
            return False
        flags_seen = multihost.to_host(np.asarray([self.received is not None]))
        return bool(np.any(flags_seen))


_FINITE_KEYS = ("loss", "grad_norm", "param_norm")


def _check_finite(pending: list, last_saved: int | None, directory: str, config) -> None:
    """Raises TrainingDiverged at the first step in `pending` with a non-finite value."""
    for step, values in jax.device_get(pending):
        bad = [f"{key}={float(value)}" for key, value in values.items() if not np.isfinite(value)]
        if bad:
            kept = (
                f"the last good checkpoint is step {last_saved} in {directory}"
                if last_saved
                else "no checkpoint was saved"
            )
            raise TrainingDiverged(
                f"training diverged at step {step}: {', '.join(bad)}; stopped, and {kept}. Lower "
                f"train.learning_rate (now {config.train.learning_rate}), raise "
                "train.warmup_steps or tighten train.grad_clip_norm, then rerun to resume."
            )
    pending.clear()


def _evaluate(eval_step, state, dataset: data.Dataset, mesh, config) -> dict:
    """Token-weighted means over the validation batches, with what was used: `eval_batches`,
    `eval_full_pass` (1: the whole split once, `data.Dataset.full_pass`; 0: the first
    `train.eval_steps` batches, the same ones at every evaluation) and `eval_dropless` (1: no
    capacity limit, `train.eval_dropless`; 0: the eval capacity factor)."""
    full_pass = config.train.eval_steps == EVAL_FULL_PASS
    if full_pass:
        batches = dataset.full_pass()
    else:
        batches = (dataset.batch(index) for index in range(config.train.eval_steps))
    results = []
    for batch in batches:
        results.append(eval_step(state, multihost.global_batch(batch, mesh, config.mesh.rules)))
    means = metrics.weighted_means(jax.device_get(results))
    used = {"eval_batches": len(results), "eval_full_pass": int(full_pass)}
    return {**means, **used, "eval_dropless": int(config.train.eval_dropless)}


def _train_loop(config, workdir, prepared, state, train_step, eval_step, checkpoints, start):
    """Steps `start + 1 .. train.num_steps`; returns the RunResult."""
    train, mesh, rules = config.train, prepared.mesh, config.mesh.rules
    main = multihost.is_main_process()
    writer = metrics.MetricsWriter(workdir, enabled=main)
    progress = metrics.Progress(start_step=start, num_steps=train.num_steps, enabled=main)
    rng = jax.device_put(jax.random.key(config.seed), train_state.replicated(mesh))
    spec = prepared.train_data.element_spec
    tokens_per_step = jax.process_count() * sum(
        int(np.prod(shape)) for key, (shape, _) in spec.items() if key.endswith("inputs")
    )
    pending, window, last_saved, step, preempted = [], [], start or None, start, False
    clock, timed_steps = time.perf_counter(), 0
    executor = ThreadPoolExecutor(max_workers=1)  # reads the next batch during this step
    next_batch = executor.submit(prepared.train_data.batch, step)
    try:
        with _StopSignals() as stop_signals:
            while step < train.num_steps:
                batch = multihost.global_batch(next_batch.result(), mesh, rules)
                next_batch = executor.submit(prepared.train_data.batch, step + 1)
                state, step_metrics = train_step(state, batch, rng)
                step += 1
                timed_steps += 1
                pending.append((step, {key: step_metrics[key] for key in _FINITE_KEYS}))
                window.append(step_metrics)
                preempted = stop_signals.requested(step)
                log_now = step % train.log_every == 0 or step == train.num_steps
                eval_now = prepared.eval_data is not None and (
                    step % train.eval_every == 0 or step == train.num_steps
                )
                save_now = step % train.checkpoint_every == 0 or step == train.num_steps
                if log_now or eval_now or save_now or preempted:
                    _check_finite(pending, last_saved, checkpoints.directory, config)
                if log_now:
                    values = metrics.window_mean(jax.device_get(window))
                    window.clear()
                    del values["weight_sum"]
                    elapsed = time.perf_counter() - clock
                    values["tokens_per_second"] = timed_steps * tokens_per_step / elapsed
                    writer.write(step, "train", values)
                    shown = {"loss": values["loss"], "tokens/s": values["tokens_per_second"]}
                    progress.update(step, shown)
                else:
                    progress.update(step)
                if eval_now:
                    eval_values = _evaluate(eval_step, state, prepared.eval_data, mesh, config)
                    writer.write(step, "eval", eval_values)
                    progress.show_eval(step, eval_values)
                if save_now or preempted:
                    checkpoints.save(step, state, {"step": step}, prepared.signature)
                    last_saved = step
                if log_now or eval_now or save_now:
                    jax.block_until_ready(state.step)
                    clock, timed_steps = time.perf_counter(), 0
                if preempted:
                    break
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        checkpoints.close()
        writer.close()
        progress.close()
    stopped_by = stop_signals.received if preempted else None
    return RunResult(step=step, preempted=preempted, state=state, stopped_by=stopped_by)


def _write_identity(workdir: str, prepared: _Prepared, start: int, *, resumed: bool) -> None:
    """`config.json` (the resolved config) and a line of the run history; process 0 only."""
    if not multihost.is_main_process():
        return
    os.makedirs(workdir, exist_ok=True)
    if resumed:
        message = run_identity.resume_message(
            start, prepared.config.train.num_steps, prepared.changes
        )
        sys.stderr.write(f"moe_jax.train: {message}\n")
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.write(prepared.config.to_json_best_effort(indent=2) + "\n")
    os.replace(path + ".tmp", path)
    run_identity.append_history(workdir, start, prepared.changes, resumed=resumed)


def _create_state(config, mesh, optimizer, initialize=None):
    """`train_state.create_state` with the weights of `train.init_from` (`moe_jax.hf`), if set,
    then what `initialize(model)` sets in place."""

    def initialize_model(model):
        hf.init_from(config, model)
        if initialize is not None:
            initialize(model)

    return train_state.create_state(config, mesh, optimizer, initialize_model)


def run(config, workdir: str, *, devices=None) -> RunResult:
    """Train `config` in `workdir`, resuming from its latest checkpoint if there is one.

    `devices` (default: all) are the devices the mesh is laid over. Raises SetupError (a
    ValueError) before writing anything when the config, mesh, data, workdir or checkpoints do
    not fit (a resume that changes a key `run_identity` does not allow, an unreadable latest
    checkpoint), and TrainingDiverged when the loss stops being finite.
    """
    workdir = os.path.abspath(workdir)
    try:
        prepared = _prepare(config, workdir, devices)
    except SetupError:
        raise
    except ValueError as error:
        raise SetupError(str(error)) from error
    config, mesh = prepared.config, prepared.mesh
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    teacher, teacher_state = None, None
    if config.distill.teacher:  # restored outside the mesh context: it builds its own
        teacher, teacher_state = _load_teacher(config.distill.teacher, mesh)
    with jax.set_mesh(mesh):
        target, graphdef, rng_state = prepared.target, prepared.graphdef, prepared.rng_state
        shardings = jax.tree.map(lambda leaf: leaf.sharding, target)
        latest = multihost.agree_on_step(prepared.resume_step)
        start = latest or 0
        if latest is not None:  # step 0 too: a converted checkpoint (moe_jax.convert)
            existing = checkpoint.Checkpoints(directory, keep=1, read_only=True)
            try:
                state, data_state = existing.restore(start, target)
            except checkpoint.UnreadableCheckpoint as error:
                raise _unreadable(error, existing, workdir) from None
            finally:
                existing.close()
            if data_state["step"] != start:
                raise SetupError(f"checkpoint {start} holds data position {data_state}.")
        _write_identity(workdir, prepared, start, resumed=latest is not None)
        multihost.sync("moe_jax.train: workdir ready")
        checkpoints = checkpoint.Checkpoints(directory, keep=config.train.keep_checkpoints)
        if latest is None:
            state = _create_state(config, mesh, prepared.optimizer)
        if multihost.is_main_process():
            metrics.truncate_metrics(workdir, start)
        jitted_step = train_state.jit_train_step(
            graphdef,
            rng_state,
            prepared.optimizer,
            prepared.schedule,
            config,
            mesh,
            shardings,
            prepared.train_data.element_spec,
            teacher,
        )

        def train_step(state, batch, rng):
            return jitted_step(state, batch, rng, teacher_state)

        eval_step = None
        if prepared.eval_data is not None:
            eval_step = train_state.jit_eval_step(
                graphdef, rng_state, config, mesh, shardings, prepared.eval_data.element_spec
            )
        return _train_loop(
            config, workdir, prepared, state, train_step, eval_step, checkpoints, start
        )


def save_initial_checkpoint(config, workdir: str, *, devices=None, initialize=None) -> str:
    """Writes `config.json` and a step-0 checkpoint of the state a new run of `config` starts
    from (random weights, or `train.init_from`'s, then what `initialize(model)` sets in place on
    the freshly built, sharded model) into `workdir`, which must hold no checkpoint; `run`
    resumes from it. Returns the checkpoint directory."""
    workdir = os.path.abspath(workdir)
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    if os.path.isdir(directory) and os.listdir(directory):
        raise ValueError(f"{directory} already holds checkpoints; use a new --workdir.")
    prepared = _prepare(config, workdir, devices)
    config = prepared.config
    _write_identity(workdir, prepared, 0, resumed=False)
    with jax.set_mesh(prepared.mesh):
        state = _create_state(config, prepared.mesh, prepared.optimizer, initialize)
        checkpoints = checkpoint.Checkpoints(directory, keep=config.train.keep_checkpoints)
        checkpoints.save(0, state, {"step": 0}, prepared.signature)
        checkpoints.close()
    return directory


# -------------------------------------------------------------------------------- the CLI


def _define_flags():
    config = config_flags.DEFINE_config_file(
        "config", None, "Config file and variant, e.g. configs/switch.py:tiny."
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
    cli.define_multihost_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    return config


def main(argv: list[str], config_flag) -> int:
    return run_command(argv, config_flag.value, flags.FLAGS.workdir)


def run_command(argv: list[str], config, workdir: str) -> int:
    """The body of a training CLI (`moe_jax.train`, `moe_jax.distill`): trains `config` in
    `workdir` and reports bad setups and divergence on stderr with status 1."""
    options = cli.flag_values(argv)
    if options.coordinator_address or cli.cluster_detected():
        multihost.initialize(options.coordinator_address, options.num_processes, options.process_id)
    try:
        result = run(config, workdir)
    except SetupError as error:
        sys.stderr.write(f"moe_jax.train: {error}\n")
        sys.stdout.flush()
        sys.stderr.flush()
        # nothing was written; exit now, because a failed checkpoint read can leave orbax's
        # asyncio reads in flight, whose teardown at interpreter exit prints tracebacks
        os._exit(1)
    except TrainingDiverged as error:
        sys.stderr.write(f"moe_jax.train: {error}\n")
        return 1
    if multihost.is_main_process():
        how = f"stopped by {result.stopped_by} at" if result.preempted else "trained to"
        print(
            f"{how} step {result.step}\n  metrics: {os.path.join(workdir, metrics.METRICS_FILE)}"
            f"\n  tensorboard: {os.path.join(workdir, metrics.TENSORBOARD_DIR)}"
            f"\n  checkpoints: {os.path.join(workdir, checkpoint.CHECKPOINT_DIR)}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    _config_flag = _define_flags()
    app.run(functools.partial(main, config_flag=_config_flag), flags_parser=cli.parse_flags)

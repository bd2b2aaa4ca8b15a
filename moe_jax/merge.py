"""Expert merging: an MoE of E experts per sparse layer shrunk to E' < E for serving.

    python -m moe_jax.merge --from=runs/switch --num_experts=4 --workdir=runs/merged4
    python -m moe_jax.train --config=... --workdir=runs/merged4   # optional recovery fine-tune

Per sparse layer, the experts are grouped by the similarity of their router rows (the columns
of the router kernel f32[M, E]: experts the router treats alike, as in the merging methods of
e.g. Li et al. 2024, "Merge, Then Compress", whose grouping uses router logits): agglomerative
clustering that repeatedly joins the two groups whose usage-weighted mean router rows have the
largest cosine similarity (ties: the lowest expert indices), until E' groups are left, ordered
by their lowest expert index. Each group becomes one expert whose `wi`, `wi_gate`, `wo` and
router row(s) (`kernel`, and `noise_kernel` of noisy top-k) are the usage-weighted averages of
its members' (equal weights where the group's usage is 0). Usage is each expert's share of the
router's choices measured on training batches (`--usage_batches`; 0: uniform).

Exact case: merging experts that are identical copies, with combine weights renormalised to sum
to 1 (`moe.normalize='topk'`, k <= E') and no token dropped, leaves the model's function
unchanged (e.g. a freshly upcycled model, `moe_jax.upcycle`). With raw router probabilities as
weights (Switch's normalize='none') merging changes the softmax's denominator and so the output
scale. The written run has `moe.num_experts = E'` and everything else of the source run; the
aux-free router's selection bias (state, not a parameter) starts again from zero. Layers must
be unscanned (`model.scan_layers=False`); the hash router has no rows to merge.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from moe_jax import convert, data, train
from moe_jax.steps import forward
from moe_jax.upcycle import EXPERT_WEIGHTS, flat_params, set_params

Path = tuple[Any, ...]
ROUTER_ROWS = ("kernel", "noise_kernel")  # router weights f32[M, E]


def check_target(num_experts: int, new_num_experts: int, k: int) -> None:
    """Raises ValueError unless k <= E' < E."""
    if new_num_experts >= num_experts:
        raise ValueError(
            f"merging to {new_num_experts} experts needs fewer than the model's {num_experts}; "
            f"choose --num_experts between k={k} and {num_experts - 1}."
        )
    if new_num_experts < k:
        raise ValueError(
            f"merging to {new_num_experts} experts leaves fewer than the k={k} each token "
            f"chooses; choose --num_experts between {k} and {num_experts - 1}."
        )


def group_experts(router: np.ndarray, usage: np.ndarray, num_groups: int) -> list[list[int]]:
    """The experts of one layer in `num_groups` groups (see the module doc).

    `router: f32[M, E]` (column e is expert e's router row), `usage: f32[E] >= 0`. Returns
    groups of expert indices, each sorted, ordered by their first index.
    """
    router, usage = np.asarray(router, np.float64), np.asarray(usage, np.float64)
    groups = [[e] for e in range(router.shape[1])]

    def centre(group: list[int]) -> np.ndarray:
        weights = _weights(usage[group])
        row = router[:, group] @ weights  # [M]
        return row / max(np.linalg.norm(row), 1e-30)

    while len(groups) > num_groups:
        centres = np.stack([centre(group) for group in groups])  # [groups, M]
        similarity = centres @ centres.T  # [groups, groups]
        np.fill_diagonal(similarity, -np.inf)
        i, j = np.unravel_index(np.argmax(similarity), similarity.shape)  # first max: lowest
        i, j = min(i, j), max(i, j)
        groups[i] = sorted(groups[i] + groups[j])
        del groups[j]
    return sorted(groups)


def _weights(usage: np.ndarray) -> np.ndarray:
    """Usage-weighted averaging weights f64[n] summing to 1 (equal where the usage is 0)."""
    total = usage.sum()
    return usage / total if total > 0 else np.full(len(usage), 1.0 / len(usage))


def merge_layer(
    experts: dict[str, jax.Array], router: dict[str, jax.Array], groups: list[list[int]], usage
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """`(experts, router)` of one layer with each group merged into one expert.

    `experts`: `wi, wi_gate: f32[E, M, H]`, `wo: f32[E, H, M]`; `router`: `kernel` (and
    `noise_kernel`) f32[M, E]; `usage: f32[E]`. The results have E' = len(groups) experts.
    """
    usage = np.asarray(usage, np.float64)
    mix = np.zeros((len(groups), len(usage)), np.float32)  # [E', E] averaging weights
    for new, group in enumerate(groups):
        mix[new, group] = _weights(usage[group])
    mix = jnp.asarray(mix)
    merged_experts = {
        name: jnp.einsum("ne,e...->n...", mix, w.astype(jnp.float32)).astype(w.dtype)
        for name, w in experts.items()
    }  # [E', M, H] or [E', H, M]
    merged_router = {
        name: jnp.einsum("ne,me->mn", mix, w.astype(jnp.float32)).astype(w.dtype)
        for name, w in router.items()
    }  # [M, E']
    return merged_experts, merged_router


def moe_layers(params: dict[Path, jax.Array]) -> list[Path]:
    """The paths of the sparse layers (parents of a router kernel) in the order of the model's
    `MoeAux` rows: the encoder's before the decoder's, each in depth order."""
    layers = {path[:-2] for path in params if path[-2:] == ("router", "kernel")}
    return sorted(
        layers,
        key=lambda path: (path[0] != "encoder", tuple(str(part).zfill(8) for part in path[1:])),
    )


def merge_params(
    params: dict[Path, jax.Array],
    new_params: dict[Path, jax.Array],
    num_experts: int,
    usage: np.ndarray | None = None,
) -> dict[Path, jax.Array]:
    """The merged model's parameters (a pure function of arrays; see the module doc).

    `params`: the source model's (`flat_params`, unscanned); `new_params`: a model of the same
    config with `num_experts` experts (its shapes; its values are not used); `usage: f32[S, E]`
    per sparse layer in depth order, None for uniform.
    """
    layers = moe_layers(params)
    if not layers:
        raise ValueError("the model has no sparse layer with a router kernel to merge.")
    old_num_experts = params[(*layers[0], "router", "kernel")].shape[1]
    if usage is None:
        usage = np.ones((len(layers), old_num_experts))
    if np.shape(usage) != (len(layers), old_num_experts):
        raise ValueError(
            f"usage has shape {np.shape(usage)}; it needs one row of {old_num_experts} per "
            f"sparse layer ({len(layers)})."
        )
    result = dict(params)
    for layer, layer_usage in zip(layers, usage):
        experts = {
            name: params[(*layer, name)] for name in EXPERT_WEIGHTS if (*layer, name) in params
        }
        router = {
            name: params[(*layer, "router", name)]
            for name in ROUTER_ROWS
            if (*layer, "router", name) in params
        }
        groups = group_experts(np.asarray(router["kernel"]), layer_usage, num_experts)
        merged_experts, merged_router = merge_layer(experts, router, groups, layer_usage)
        result.update({(*layer, name): value for name, value in merged_experts.items()})
        result.update({(*layer, "router", name): value for name, value in merged_router.items()})
    for path, value in new_params.items():
        if result[path].shape != value.shape:
            raise ValueError(f"merged {path} has shape {result[path].shape}, not {value.shape}.")
    return {path: result[path] for path in new_params}


def measure_usage(model: nnx.Module, config, num_batches: int) -> np.ndarray:
    """f32[S, E]: each sparse layer's share of the router's choices (before capacity) over the
    first `num_batches` training batches, deterministic forward passes."""
    dataset = data.dataset_from_config(config, "train")
    run = nnx.jit(lambda model, batch: forward(model, batch, config, deterministic=True)[1])
    loads = [run(model, dataset.batch(index)).expert_load_routed for index in range(num_batches)]
    return np.mean(np.asarray(jax.device_get(loads)), axis=0)  # [S, E]


def merge_run(
    source: str, new_num_experts: int, workdir: str, *, usage_batches: int = 4, devices=None
) -> str:
    """Writes step 0 of a run in `workdir` (over `devices`, default all): the latest checkpoint
    of the run in `source` with each sparse layer merged to `new_num_experts` experts. Checks
    run before anything is written."""
    config, model, _ = train.restore_for_inference(source)
    moe = config.moe
    check_target(moe.num_experts, new_num_experts, moe.k)
    if config.model.scan_layers:
        raise ValueError("the run has model.scan_layers=True; merging maps unscanned layers.")
    if moe.router == "hash":
        raise ValueError("the hash router has no router rows to group or merge experts by.")
    if usage_batches < 0:
        raise ValueError(f"--usage_batches={usage_batches} must be >= 0 (0: uniform usage).")
    stored = train.config_from_workdir(source)  # the run's own mesh settings, for the new run
    usage = measure_usage(model, config, usage_batches) if usage_batches else None
    params = flat_params(model)
    stored.moe.num_experts = new_num_experts

    def initialize(new_model: nnx.Module) -> None:
        set_params(new_model, merge_params(params, flat_params(new_model), new_num_experts, usage))

    return train.save_initial_checkpoint(stored, workdir, devices=devices, initialize=initialize)


def _define_flags() -> None:
    flags.DEFINE_string("from", None, "The MoE run's moe_jax.train workdir.")
    flags.DEFINE_integer("num_experts", None, "E': experts per sparse layer after merging.")
    flags.DEFINE_string("workdir", None, "New run directory for the merged model.")
    flags.DEFINE_integer("usage_batches", 4, "Training batches to measure usage on (0: uniform).")
    flags.mark_flags_as_required(["from", "num_experts", "workdir"])


def main(argv) -> int:
    options = flags.FLAGS
    return convert.run_tool(
        "moe_jax.merge",
        argv,
        lambda: merge_run(
            options["from"].value,
            options.num_experts,
            options.workdir,
            usage_batches=options.usage_batches,
        ),
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)

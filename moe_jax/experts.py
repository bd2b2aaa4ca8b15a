"""Expert feed-forward maths over stacked weights, and the initialisers for them.

Pure JAX (no Flax). One definition of the FFN, `ffn`, takes the matmul as an argument, so the
same maths runs three ways:

- `stacked_matmul`: every expert's tokens in one batched matmul, `x: [E, N, M] @ w: [E, M, H]`
  (the einsum and gather dispatch backends);
- `dense_matmul`: one weight for every row, `x: [..., M] @ w: [M, H]` (dense FFN, shared experts);
- a block matmul (`moe_jax.blocked.block_matmul`): rows sorted into fixed-size blocks, each block
  multiplied by its own expert's weight (the dropless backend).

Parameters are a dict: `wi` (input projection), `wi_gate` (the second input projection of gated
units, present only for gated activations) and `wo` (output projection), and optionally the
biases `bi`, `bi_gate` (on the input projections) and `bo` (on the output projection), as in
gpt-oss. Stacked expert weights are `wi, wi_gate: [E, M, H]`, `wo: [E, H, M]`, biases
`bi, bi_gate: [E, H]`, `bo: [E, M]`; a dense FFN drops the leading E.
Gated units compute `act(x @ wi_gate) * (x @ wi)` (GEGLU: act = gelu; SwiGLU: act = silu), or,
for 'swiglu_clamped' (gpt-oss), `clamped_swiglu(x @ wi_gate, x @ wi)`.

A bias is added as the product of a ones column `[..., 1]` with the bias as a one-row weight
`[E, 1, H]`, through the same `matmul`: each row then meets its own expert's bias in every form
above (a block of rows its block's expert, a ragged run its run's), and the gradient reaches the
bias the way it reaches the weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Matmul = Callable[[jax.Array, jax.Array], jax.Array]

WEIGHT_NAMES = ("wi", "wi_gate", "wo")  # the matrices, `wi_gate` for gated units only
BIAS_NAMES = ("bi", "bi_gate", "bo")  # their biases, `bi_gate` for gated units only


def _glu(nonlinearity: Callable[[jax.Array], jax.Array]) -> Callable[..., jax.Array]:
    """The gated unit `nonlinearity(gate) * up` of f32[..., H] projections."""

    def unit(gate: jax.Array, up: jax.Array) -> jax.Array:
        return nonlinearity(gate) * up

    return unit


def clamped_swiglu(
    gate: jax.Array, up: jax.Array, *, limit: float = 7.0, alpha: float = 1.702
) -> jax.Array:
    """gpt-oss's clamped SwiGLU of f32[..., H] projections: `(clip(up) + 1) * glu`.

    `gate` is clipped from above at `limit` and `up` to `[-limit, limit]`; `glu = gate *
    sigmoid(alpha * gate)` (SiLU with slope `alpha`, 1.702 being the sigmoid approximation of
    GELU). The defaults are gpt-oss's (`swiglu_limit`, `swiglu_alpha`).
    """
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1.0) * gate * jax.nn.sigmoid(alpha * gate)


# activation name -> (unit, gated): unit(x @ wi), or for gated units unit(x @ wi_gate, x @ wi)
_ACTIVATIONS: dict[str, tuple[Callable[..., jax.Array], bool]] = {
    "relu": (jax.nn.relu, False),
    "gelu": (jax.nn.gelu, False),
    "gated-gelu": (_glu(jax.nn.gelu), True),
    "swiglu": (_glu(jax.nn.silu), True),
    "swiglu_clamped": (clamped_swiglu, True),
}
ACTIVATIONS = tuple(_ACTIVATIONS)


def check_activation(activation: str) -> None:
    """Raise a ValueError naming the known activations if `activation` is not one of them."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"Unknown FFN activation {activation!r}; use one of {ACTIVATIONS}.")


def is_gated(activation: str) -> bool:
    """True for gated linear units (gated-gelu, swiglu, swiglu_clamped): they need `wi_gate`."""
    check_activation(activation)
    return _ACTIVATIONS[activation][1]


def param_names(activation: str, *, bias: bool = False) -> tuple[str, ...]:
    """The keys of the FFN parameter dict: `wi`, `wo`, `wi_gate` for gated units, and with
    `bias` their biases `bi`, `bo` (and `bi_gate`)."""
    names = WEIGHT_NAMES + BIAS_NAMES if bias else WEIGHT_NAMES
    return tuple(name for name in names if is_gated(activation) or not name.endswith("_gate"))


def truncated_normal_init(scale: float = 0.1):
    """Switch Transformer init: truncated normal (2 std) with std `sqrt(scale / fan_in)`.

    Switch (Fedus et al. 2022, Sec. 2.3 and Table 3) uses scale 0.1, a tenth of the usual 1.0.
    `fan_in` is the size of the second-to-last axis (the input dim M of `wi: [E, M, H]`, H of
    `wo`); leading axes (experts) are batch axes. This is JAX's `variance_scaling(scale,
    'fan_in', 'truncated_normal')`, drawn in float32 and then cast to `dtype`.
    Returns `init(key, shape, dtype=float32) -> array`.
    """
    if not scale > 0:
        raise ValueError(f"init scale must be > 0, got {scale!r}; Switch uses 0.1.")

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        draw = jax.nn.initializers.variance_scaling(
            scale, "fan_in", "truncated_normal", batch_axis=tuple(range(len(shape) - 2))
        )
        return draw(key, shape, jnp.float32).astype(dtype)

    return init


def init_ffn_params(
    key: jax.Array,
    *,
    d_model: int,
    d_ff: int,
    activation: str,
    num_experts: int | None = None,
    init_scale: float = 1.0,
    bias: bool = False,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
    """FFN weights: `wi: [E, M, H]`, `wo: [E, H, M]` with `num_experts`, else `[M, H]`, `[H, M]`.

    Every matrix is drawn with `truncated_normal_init(init_scale)` over its own fan-in
    (1.0 is the usual variance-scaling init; Switch uses 0.1). With `bias`, zero biases
    `bi (, bi_gate): [E, H]` and `bo: [E, M]` (without E: `[H]`, `[M]`).
    """
    check_activation(activation)
    lead = () if num_experts is None else (num_experts,)
    init = truncated_normal_init(init_scale)
    key_wi, key_gate, key_wo = jax.random.split(key, 3)
    params = {
        "wi": init(key_wi, (*lead, d_model, d_ff), dtype),  # [E, M, H]
        "wo": init(key_wo, (*lead, d_ff, d_model), dtype),  # [E, H, M]
    }
    if is_gated(activation):
        params["wi_gate"] = init(key_gate, (*lead, d_model, d_ff), dtype)  # [E, M, H]
    if bias:
        params["bi"] = jnp.zeros((*lead, d_ff), dtype)  # [E, H]
        params["bo"] = jnp.zeros((*lead, d_model), dtype)  # [E, M]
        if is_gated(activation):
            params["bi_gate"] = jnp.zeros((*lead, d_ff), dtype)  # [E, H]
    return params


def stacked_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x: [E, N, A] @ w: [E, A, B] -> f32[E, N, B]`, accumulating in float32."""
    return jnp.einsum("ena,eab->enb", x, w, preferred_element_type=jnp.float32)


def dense_matmul(x: jax.Array, w: jax.Array, *, contracted: int = 1) -> jax.Array:
    """`x: [..., A] @ w: [A, B] -> f32[..., B]` as one 2-D matmul on rows, accumulating in f32.

    x's leading dims are flattened into rows and w's trailing dims into columns, so XLA runs a
    single `[R, A] @ [A, B]` product: XLA:CPU runs the same contraction written `...a,ab->...b`
    on a 3-D input about 1.6x slower (issue 14); the reshapes are free on every backend.
    `contracted` trailing dims of x meet as many leading dims of w, and w's remaining dims end
    the output: `x: [B, L, M] @ w: [M, N, D] -> f32[B, L, N, D]` (contracted=1) and
    `x: [B, L, N, D] @ w: [N, D, M] -> f32[B, L, M]` (contracted=2).
    """
    lead, inner = x.shape[: x.ndim - contracted], x.shape[x.ndim - contracted :]
    if tuple(w.shape[:contracted]) != tuple(inner):
        raise ValueError(
            f"dense_matmul contracts x's last {contracted} dims {inner} with w's first "
            f"{contracted}, but w is {w.shape}; pass weights shaped [*{inner}, ...]."
        )
    rows = x.reshape(math.prod(lead), math.prod(inner))  # [R, A]
    columns = w.reshape(math.prod(inner), math.prod(w.shape[contracted:]))  # [A, B]
    out = jnp.dot(rows, columns, preferred_element_type=jnp.float32)  # [R, B]
    return out.reshape(*lead, *w.shape[contracted:])  # [..., B]


def ffn(
    params: dict[str, jax.Array],
    x: jax.Array,
    *,
    activation: str,
    matmul: Matmul = stacked_matmul,
    dtype=None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    swiglu_limit: float = 7.0,
    swiglu_alpha: float = 1.702,
) -> jax.Array:
    """The FFN `wo(act(x wi))` (or gated `wo(act(x wi_gate) * x wi)`), applied with `matmul`.

    Args:
      params: `wi`, `wo` (and `wi_gate` for gated activations), shaped as `matmul` expects,
        and optionally the biases `bi`, `bi_gate`, `bo` (see the module docstring): each one
        present is added to its projection.
      x: input rows, e.g. f32[E, N, M] for `stacked_matmul`.
      activation: relu | gelu | gated-gelu | swiglu | swiglu_clamped.
      matmul: how rows meet weights (see the module docstring).
      dtype: compute dtype of the matmul operands (e.g. bfloat16); accumulation, the activation
        and the output are float32. None keeps the operands' own dtypes.
      dropout_rate: expert dropout on the hidden layer (Switch fine-tuning uses 0.4, Table 4).
      dropout_rng: key for the dropout mask; required when `dropout_rate > 0`.
      swiglu_limit, swiglu_alpha: the clamp and the sigmoid slope of 'swiglu_clamped'
        (`clamped_swiglu`); the other activations have none.

    Returns:
      f32 array with x's shape (last dim M).
    """
    check_activation(activation)
    unit, gated = _ACTIVATIONS[activation]
    if activation == "swiglu_clamped":
        unit = functools.partial(unit, limit=swiglu_limit, alpha=swiglu_alpha)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}.")

    def cast(a: jax.Array) -> jax.Array:
        return a if dtype is None else a.astype(dtype)

    def project(rows: jax.Array, weight: str, bias: str) -> jax.Array:
        """`rows @ params[weight]`, plus `params[bias]` when present (module docstring): f32."""
        out = matmul(rows, cast(params[weight]))  # [..., B]
        if bias not in params:
            return out
        ones = jnp.ones_like(rows[..., :1])  # [..., 1], varying over shard_map axes as rows
        return out + matmul(ones, cast(params[bias])[..., None, :])  # [..., B]

    x = cast(x)
    up = project(x, "wi", "bi")  # [..., H]
    hidden = unit(project(x, "wi_gate", "bi_gate"), up) if gated else unit(up)  # [..., H]
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs a dropout_rng; pass a key or set rate 0.")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, hidden.shape)
        hidden = jnp.where(keep, hidden / (1.0 - dropout_rate), 0.0)
    return project(cast(hidden), "wo", "bo")  # [..., M]

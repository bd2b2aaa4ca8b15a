"""Weight-only quantization of the expert weights, for evaluation and decoding.

    python -m moe_jax.quantize --workdir=runs/switch --formats=float32,bfloat16,int8,int4

    config, model, _ = train.restore_for_inference("runs/switch")
    decode.generate(quantize_experts(model, 4), prompts, max_new_tokens=32)

`quantize_experts(model, bits, group_size=0)` replaces, in place, every stacked expert weight
(`wi, wi_gate: [E, M, H]`, `wo: [E, H, M]`; scanned layers stack them as `[R, E, M, H]`) of
every MoE layer by a `qwix.QArray`: integer values stored as int8 or int4 and float32 scales
from the absolute maximum (symmetric, no zero point), one scale per layer, expert and output
channel (`[E, 1, N]`, scanned `[R, E, 1, N]`), or with `group_size = g` one per group of g
consecutive input rows as well (`[E, A / g, N]`, the sub-channel scales int4 needs). The scale
is taken over the contracted axis (-2) alone, so a scanned layer is quantized as it would be
unscanned.
The layer dequantizes the weights (`qvalue * scale`) when it runs
(`MoeFeedForward.expert_params`), so the stored weights take 1 or 1/2 byte per value and the
maths is the float model's on the rounded weights. Routers, attention, embeddings and dense
FFNs stay in float, and so do the expert biases of `moe.expert_bias` (`bi`, `bi_gate`, `bo`).

Library: qwix (Google's JAX quantization library) provides the quantized array, its scales and
its rounding (`qwix.quantize`, `qwix.dequantize`). Its model-level PTQ (`qwix.quantize_model`)
is not used: it recognises a weight by tracing the operand of an intercepted einsum back to an
`nnx.Param` of the module whose method is running, while our expert weights reach their matmul
through the dispatch backends' `matmul` closure (and, with expert parallelism, a `shard_map`),
so no rule would match them; storing QArrays in the parameters themselves keeps every backend.

`expert_bytes(model)` counts the stored expert weights at their logical width (int4: half a
byte per value, as packed on TPU/GPU; host memory holds an int4 value in a byte), scales
included. The CLI prints the expert bytes and the validation cross-entropy of a run's latest
checkpoint in each format.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from absl import app, flags
from flax import nnx

from moe_jax import cli, experts, train
from moe_jax.score import eval_cross_entropy

INTEGER_TYPES = {8: jnp.int8, 4: jnp.int4}
FORMATS = ("float32", "bfloat16", "int8", "int4")


def _expert_weights(model: nnx.Module):
    """`(module, name)` of every stacked expert weight matrix of the MoE layers of `model`."""
    for _, module in nnx.iter_graph(model):
        if hasattr(module, "expert_param_names"):
            for name in module.expert_param_names():
                if name in experts.WEIGHT_NAMES:
                    yield module, name


def quantize_array(weight: jax.Array, bits: int, group_size: int = 0) -> qwix.QArray:
    """`weight: f32[..., E, A, N]` (A contracted; scanned layers add a leading `[R]`) as a
    QArray of `bits`-bit integers with f32 scales `[..., E, 1, N]` (per expert and output
    channel of each layer) or `[..., E, A / group_size, N]`."""
    if bits not in INTEGER_TYPES:
        raise ValueError(
            f"expert weights quantize to {sorted(INTEGER_TYPES)} bits, not {bits}; use "
            "--expert_bits=8 or 4 (or a float format: float32, bfloat16)."
        )
    contracted = weight.ndim - 2
    if group_size < 0 or (group_size and weight.shape[contracted] % group_size):
        raise ValueError(
            f"group_size={group_size} must be 0 (per channel) or divide the contracted "
            f"dimension {weight.shape[contracted]} of the expert weights."
        )
    tiles = {contracted: group_size} if group_size else None
    return qwix.quantize(
        jnp.asarray(weight, jnp.float32),
        INTEGER_TYPES[bits],
        channelwise_axes=tuple(axis for axis in range(weight.ndim) if axis != contracted),
        tiled_axes=tiles,
        scale_dtype=jnp.float32,
    )


def quantize_experts(model: nnx.Module, bits: int, group_size: int = 0) -> nnx.Module:
    """Replaces `model`'s expert weights by `bits`-bit QArrays in place; returns `model`."""
    for module, name in _expert_weights(model):
        variable = getattr(module, name)
        variable.set_value(quantize_array(variable.get_value(), bits, group_size))
    return model


def cast_experts(model: nnx.Module, dtype) -> nnx.Module:
    """Stores `model`'s expert weights in the float `dtype` (e.g. bfloat16), in place."""
    for module, name in _expert_weights(model):
        variable = getattr(module, name)
        variable.set_value(variable.get_value().astype(dtype))
    return model


def expert_bytes(model: nnx.Module) -> int:
    """Bytes of the stored expert weights (int4 counted as half a byte; scales included)."""
    total = 0.0
    for module, name in _expert_weights(model):
        weight = getattr(module, name).get_value()
        arrays = [weight.qvalue, weight.scale] if isinstance(weight, qwix.QArray) else [weight]
        for array in arrays:
            bits = 4 if array.dtype == jnp.int4 else 8 * array.dtype.itemsize
            total += array.size * bits / 8
    return int(total)


def in_format(model: nnx.Module, name: str, group_size: int = 0) -> nnx.Module:
    """A copy of `model` with its expert weights stored in format `name` (one of FORMATS)."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; use some of {', '.join(FORMATS)}.")
    copy = nnx.clone(model)
    if name.startswith("int"):
        return quantize_experts(copy, int(name[3:]), group_size)
    return cast_experts(copy, jnp.dtype(name))


def compare_formats(workdir: str, formats, *, group_size: int = 0, eval_batches: int = 4):
    """`[(format, expert bytes, validation cross-entropy)]` of the run's latest checkpoint."""
    config, model, _ = train.restore_for_inference(workdir)
    rows = []
    for name in formats:
        variant = in_format(model, name, group_size)
        loss = eval_cross_entropy(variant, config, eval_batches)
        rows.append((name, expert_bytes(variant), loss))
    return rows


def main(argv) -> int:
    options = cli.flag_values(argv)
    try:
        rows = compare_formats(
            options.workdir,
            options.formats.split(","),
            group_size=options.group_size,
            eval_batches=options.eval_batches,
        )
    except (FileNotFoundError, ValueError) as error:
        sys.stderr.write(f"moe_jax.quantize: {error}\n")
        return 1
    print("| format | expert bytes | eval cross-entropy |")
    print("|---|---|---|")
    for name, size, loss in rows:
        print(f"| {name} | {size} | {np.float64(loss):.4f} |")
    return 0


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir whose latest checkpoint to quantize.")
    flags.DEFINE_string("formats", ",".join(FORMATS), "Expert-weight formats to compare.")
    flags.DEFINE_integer("group_size", 0, "Input rows per scale (0: one scale per channel).")
    flags.DEFINE_integer("eval_batches", 4, "Validation batches to evaluate on.")
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)

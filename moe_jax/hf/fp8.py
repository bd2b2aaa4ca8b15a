"""Block-scaled FP8 weights, as DeepSeek-V3's published checkpoints store them, read back into
floats.

DeepSeek-V3 (DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv:2412.19437, 2024, section 3.3)
trains and publishes most linear weights in FP8 E4M3 (1 sign bit, 4 exponent bits with bias 7,
3 mantissa bits; no infinities, largest magnitude 448; `ml_dtypes.float8_e4m3fn`, safetensors
dtype `F8_E4M3`), with one float32 scale per block of 128 x 128 weights. Its `config.json` says
so in `quantization_config`: `{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128,
128], "activation_scheme": "dynamic"}`.

On disk, a weight `NAME: [out, in]` (e.g. `model.layers.3.mlp.experts.0.down_proj.weight`) is
two tensors:

- `NAME: f8[..., R, C]`, the stored `[out, in]` matrix, not transposed;
- `NAME_scale_inv: f32[..., ceil(R/b0), ceil(C/b1)]` for blocks `(b0, b1)` (`weight_block_size`):
  the weight is `NAME[r, c] * NAME_scale_inv[r // b0, c // b1]`. When R or C is not a multiple
  of the block (DeepSeek-V3's `kv_a_proj_with_mqa.weight: [576, 7168]` has scales `[5, 56]`),
  the last blocks are partial and still take one scale each.

This is what the reference `weight_dequant` in DeepSeek-V3's `inference/kernel.py` computes
and what `transformers` does: its backward-pass `_dequantize_fp8_weight` (partial blocks
included) and its `Fp8Dequantize` conversion (`FineGrainedFP8Config(dequantize=True)`) multiply
in float32 and then round to the parameter's dtype, as `dequantize` does. `Fp8Dequantize` (in
transformers 5.24) takes the block from the weight's and scales' shapes, so it reads whole
blocks only: it refuses `[576, 7168]` with scales `[5, 56]`, and takes `[300, C]` with 3 rows
of scales as blocks of 100 rows. Every E4M3 value is exact in float32,
so the float32 result has one rounding (of the product) and bfloat16 a second.

Only numpy and `ml_dtypes` are used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np

SCALE_SUFFIX = "_scale_inv"
SUFFIXES = (SCALE_SUFFIX,)
DEFAULT_BLOCK = (128, 128)
# the weight and scale dtypes, as safetensors headers and numpy name them
WEIGHT_DTYPES = ("F8_E4M3", np.dtype(ml_dtypes.float8_e4m3fn).name)
SCALE_DTYPES = ("F32", np.dtype(np.float32).name)
_REDOWNLOAD = (
    "download the checkpoint again, or convert it to bfloat16 (DeepSeek-V3's "
    "`inference/fp8_cast_bf16.py`) and load that"
)


def block_size(config: Mapping) -> tuple[int, int]:
    """`(b0, b1)`, the rows and columns of weights sharing one scale: `weight_block_size` of
    `config` (a parsed `config.json`)'s `quantization_config`, `DEFAULT_BLOCK` (128 x 128) when
    it has none. Raises ValueError unless that is two positive integers."""
    block = (config.get("quantization_config") or {}).get("weight_block_size", DEFAULT_BLOCK)
    if not (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in block)
    ):
        raise ValueError(
            f"config.json's quantization_config.weight_block_size is {block!r}: the only FP8 "
            f"scales read are one per block of [rows, columns] weights, two positive integers "
            f"(DeepSeek-V3: {list(DEFAULT_BLOCK)})."
        )
    return tuple(block)


def scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The shape of the scales of a weight `[..., R, C]`: `[..., ceil(R/b0), ceil(C/b1)]`."""
    *prefix, rows, cols = weight_shape
    return (*prefix, -(-rows // block[0]), -(-cols // block[1]))


def _check_pair(
    name: str,
    weight_shape: tuple[int, ...],
    scales_shape: tuple[int, ...],
    dtypes: tuple,
    block: tuple[int, int],
) -> None:
    """Raises ValueError unless the weight `name` and its scales `NAME_scale_inv` have FP8's
    dtypes and shapes. `dtypes` is (weight dtype, scales dtype), each a safetensors name
    ("F8_E4M3") or a numpy dtype."""
    scales = name + SCALE_SUFFIX
    if str(dtypes[0]) not in WEIGHT_DTYPES:
        raise ValueError(
            f"tensor {name!r} has dtype {dtypes[0]} and block scales {scales!r}: the only scaled "
            f"weights read are float8_e4m3fn (F8_E4M3); {_REDOWNLOAD}."
        )
    if str(dtypes[1]) not in SCALE_DTYPES:
        raise ValueError(
            f"FP8 scales {scales!r} have dtype {dtypes[1]}, not float32 (F32); {_REDOWNLOAD}."
        )
    if len(weight_shape) < 2 or tuple(scales_shape) != scale_shape(weight_shape, block):
        raise ValueError(
            f"FP8 weight {name!r} {list(weight_shape)} and its scales {scales!r} "
            f"{list(scales_shape)} disagree: a weight [..., R, C] with blocks of {block[0]} x "
            f"{block[1]} (config.json's quantization_config.weight_block_size) has scales "
            f"[..., ceil(R/{block[0]}), ceil(C/{block[1]})]; {_REDOWNLOAD}."
        )


def dequantize(
    weight: np.ndarray,
    scale_inv: np.ndarray,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype=np.float32,
    *,
    name: str = "weight",
) -> np.ndarray:
    """The values of `weight: f8[..., R, C]` (float8_e4m3fn) with its block scales
    `scale_inv: f32[..., ceil(R/b0), ceil(C/b1)]`, `block = (b0, b1)`: `[..., R, C]` in `dtype`
    (any float dtype, e.g. `ml_dtypes.bfloat16`), value `[r, c]` being
    `weight[r, c] * scale_inv[r // b0, c // b1]` computed in float32, then rounded to `dtype`.
    One band of b0 rows is computed at a time, so float32 is never held for the whole weight.
    `name` names the weight in the ValueError raised for dtypes or shapes that are not FP8's."""
    _check_pair(name, weight.shape, scale_inv.shape, (weight.dtype, scale_inv.dtype), block)
    rows, cols = block
    out = np.empty(weight.shape, dtype=dtype)  # [..., R, C]
    for band in range(scale_inv.shape[-2]):
        scales = np.repeat(scale_inv[..., band, None, :], cols, axis=-1)  # [..., 1, ceil(C/b1)*b1]
        scales = scales[..., : weight.shape[-1]]  # [..., 1, C]
        part = slice(band * rows, (band + 1) * rows)
        out[..., part, :] = weight[..., part, :].astype(np.float32) * scales
    return out


def find_pairs(
    shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str], block: tuple[int, int]
) -> dict[str, tuple[int, ...]]:
    """{NAME: its shape} for every FP8 weight `NAME` with scales `NAME_scale_inv` among the stored
    tensors, from their `shapes` and `dtypes` (safetensors header names: "F8_E4M3", "F32") alone,
    for scale blocks `block`. Every name ending in `_scale_inv` is taken as FP8 scales; raises
    ValueError naming the tensor when scales have no weight, when a float8_e4m3fn tensor has no
    scales, or when a pair's dtypes or shapes are not FP8's."""
    pairs = {}
    for stored in shapes:
        if stored.endswith(SCALE_SUFFIX):
            name = stored.removesuffix(SCALE_SUFFIX)
            if name not in shapes:
                raise ValueError(
                    f"FP8 scales {stored!r} have no weight {name!r} (a weight NAME is stored as "
                    f"NAME with NAME{SCALE_SUFFIX}): the checkpoint is incomplete; {_REDOWNLOAD}."
                )
            _check_pair(name, shapes[name], shapes[stored], (dtypes[name], dtypes[stored]), block)
            pairs[name] = tuple(shapes[name])
        elif dtypes[stored] in WEIGHT_DTYPES and stored + SCALE_SUFFIX not in shapes:
            raise ValueError(
                f"FP8 tensor {stored!r} has no scales {stored + SCALE_SUFFIX!r}: the checkpoint is "
                f"incomplete, or its FP8 scales are not DeepSeek-V3's block scales; {_REDOWNLOAD}."
            )
    return pairs


def read(
    get: Callable[[str], np.ndarray],
    name: str,
    dtype=np.float32,
    block: tuple[int, int] = DEFAULT_BLOCK,
) -> np.ndarray:
    """The FP8 weight `name` as `[..., R, C]` in `dtype`: `NAME: f8[..., R, C]` and
    `NAME_scale_inv: f32[..., ceil(R/b0), ceil(C/b1)]` read through `get(stored name)` and
    dequantized (`dequantize`), in the stored `[out, in]` layout (`transformers` does not
    transpose FP8 weights either)."""
    return dequantize(get(name), get(name + SCALE_SUFFIX), block, dtype, name=name)

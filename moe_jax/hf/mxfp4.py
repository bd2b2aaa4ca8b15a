"""MXFP4 expert weights, as gpt-oss's published checkpoints store them, read back into floats.

MXFP4 is a microscaling format from the OCP Microscaling Formats (MX) Specification v1.0
(Open Compute Project, 2023): each block of 32 consecutive values shares one scale, and each
value is 4-bit FP4 E2M1 (1 sign bit, 2 exponent bits with bias 1, 1 mantissa bit: the magnitudes
0, 0.5, 1, 1.5, 2, 3, 4, 6). The scale is E8M0, an unsigned 8-bit exponent with bias 127,
meaning 2**(byte - 127); byte 255 is NaN. The gpt-oss model card (OpenAI, "gpt-oss-120b &
gpt-oss-20b Model Card", 2025) quantizes the MoE expert weights to MXFP4 (4.25 bits per
parameter) and keeps every other tensor in bfloat16.

On disk, a weight `NAME` (e.g. `model.layers.0.mlp.experts.gate_up_proj`) is two uint8 tensors:

- `NAME_blocks: u8[..., R, G, 16]`: row r of the stored matrix is G blocks of 16 bytes; byte j
  of a block holds value 2j in its low nibble and value 2j + 1 in its high nibble (the order
  `transformers`' `convert_moe_packed_tensors` unpacks; the spec leaves packing open), the
  nibble being the E2M1 code `sign << 3 | exponent << 1 | mantissa`;
- `NAME_scales: u8[..., R, G]`: the E8M0 scale of each block.

The stored matrix `[..., R, G*32]` is the `[out, in]` layout (a row per output feature, the
blocks running along the input features); `transformers` transposes its last two axes when it
dequantizes (`Mxfp4Config(dequantize=True)`) to get the in-memory parameter, and so does
`read`. For gpt-oss, with E experts, model width M and expert width H:

- `gate_up_proj_blocks: u8[E, 2H, M/32, 16]` -> `gate_up_proj: [E, M, 2H]`, the layout of
  `GptOssExperts.gate_up_proj` (gate and up interleaved along the last axis: gate `[..., ::2]`,
  up `[..., 1::2]`);
- `down_proj_blocks: u8[E, M, H/32, 16]` -> `down_proj: [E, H, M]` (`GptOssExperts.down_proj`).

This is the layout a bfloat16 gpt-oss checkpoint (`save_pretrained` of the dequantized model)
stores under the plain names. Every dequantized value is an E2M1 value times a power of two,
which float32 and bfloat16 (8 exponent bits each) both hold exactly; the one difference from
`transformers` is scale byte 255, which is NaN here, as the spec says, and +-inf or NaN there (a
published checkpoint has none).

Only numpy is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
SUFFIXES = (BLOCKS_SUFFIX, SCALES_SUFFIX)
BLOCK_BYTES = 16
BLOCK_VALUES = 2 * BLOCK_BYTES
SCALE_BIAS = 127
NAN_SCALE = 255
# the value of each E2M1 code 0..15: the high bit is the sign
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
_REDOWNLOAD = (
    "download the checkpoint again, or dequantize it with transformers "
    "(`from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True))`, then "
    "`save_pretrained`) and load that"
)


def _check_pair(
    name: str, blocks_shape: tuple[int, ...], scales_shape: tuple[int, ...], dtypes: tuple
) -> None:
    """Raises ValueError unless `NAME_blocks` / `NAME_scales` have the shapes and dtypes of
    MXFP4. `dtypes` is (blocks dtype, scales dtype), each a safetensors name ("U8") or a numpy
    dtype."""
    blocks, scales = name + BLOCKS_SUFFIX, name + SCALES_SUFFIX
    for tensor, dtype in zip((blocks, scales), dtypes):
        if str(dtype) not in ("U8", "uint8"):
            raise ValueError(
                f"MXFP4 tensor {tensor!r} has dtype {dtype}, not uint8: it is not packed FP4 "
                f"codes or E8M0 scales; {_REDOWNLOAD}."
            )
    if len(blocks_shape) < 3 or blocks_shape[-1] != BLOCK_BYTES:
        raise ValueError(
            f"MXFP4 tensor {blocks!r} has shape {list(blocks_shape)}; the only layout known is "
            f"[..., rows, blocks, {BLOCK_BYTES}] ({BLOCK_VALUES} FP4 values, {BLOCK_BYTES} bytes, "
            f"per block); {_REDOWNLOAD}."
        )
    if tuple(scales_shape) != tuple(blocks_shape[:-1]):
        raise ValueError(
            f"MXFP4 tensors {blocks!r} {list(blocks_shape)} and {scales!r} "
            f"{list(scales_shape)} disagree: the scales must be the blocks' shape without the "
            f"last axis (one scale per block); {_REDOWNLOAD}."
        )


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `read` gives for `NAME_blocks` of shape `[..., R, G, 16]`: `[..., G*32, R]`."""
    *prefix, rows, groups, _ = blocks_shape
    return (*prefix, groups * BLOCK_VALUES, rows)


def dequantize(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
    """The values of MXFP4 `blocks: u8[..., G, 16]` with `scales: u8[..., G]`: `[..., G*32]`
    in `dtype` (any float dtype, e.g. `ml_dtypes.bfloat16`), in the stored order (no
    transpose). Value 32g + 2j is the low nibble of `blocks[..., g, j]`, 32g + 2j + 1 its high
    nibble, each times 2**(scales[..., g] - 127); scale byte 255 makes its block NaN."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(
            f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}."
        )
    if blocks.ndim < 2 or blocks.shape[-1] != BLOCK_BYTES or scales.shape != blocks.shape[:-1]:
        raise ValueError(
            f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)}: expected "
            f"blocks [..., G, {BLOCK_BYTES}] and scales [..., G]."
        )
    values = np.empty((*blocks.shape[:-1], BLOCK_VALUES), dtype=np.float32)  # [..., G, 32]
    values[..., 0::2] = E2M1_VALUES[blocks & 0x0F]
    values[..., 1::2] = E2M1_VALUES[blocks >> 4]
    exponents = np.where(scales == NAN_SCALE, 0, scales.astype(np.int32) - SCALE_BIAS)
    values = np.ldexp(values, exponents[..., None])
    values[scales == NAN_SCALE] = np.nan
    values = values.reshape(*blocks.shape[:-2], -1)  # [..., G*32]
    return values.astype(dtype, copy=False)


def find_pairs(
    shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]
) -> dict[str, tuple[int, ...]]:
    """{NAME: the shape `read` gives} for every `NAME_blocks` / `NAME_scales` pair among the
    stored tensors, from their `shapes` and `dtypes` (safetensors header names: "U8", "BF16")
    alone. Every name ending in `_blocks` or `_scales` is taken as MXFP4; raises ValueError
    naming the tensor when one lacks its partner, when their shapes or dtypes are not MXFP4's,
    or when `NAME` itself is stored too."""
    pairs = {}
    for stored in shapes:
        for suffix, other in ((BLOCKS_SUFFIX, SCALES_SUFFIX), (SCALES_SUFFIX, BLOCKS_SUFFIX)):
            if stored.endswith(suffix) and stored.removesuffix(suffix) + other not in shapes:
                raise ValueError(
                    f"MXFP4 tensor {stored!r} has no partner "
                    f"{stored.removesuffix(suffix) + other!r} (a weight NAME is stored as "
                    f"NAME{BLOCKS_SUFFIX} with NAME{SCALES_SUFFIX}): the checkpoint is "
                    f"incomplete; {_REDOWNLOAD}."
                )
        if not stored.endswith(BLOCKS_SUFFIX):
            continue
        name = stored.removesuffix(BLOCKS_SUFFIX)
        scales = name + SCALES_SUFFIX
        _check_pair(name, shapes[stored], shapes[scales], (dtypes[stored], dtypes[scales]))
        if name in shapes:
            raise ValueError(
                f"tensor {name!r} is stored both plainly and as MXFP4 ({stored!r}, {scales!r}); "
                f"keep one of them."
            )
        pairs[name] = dequantized_shape(shapes[stored])
    return pairs


def read(get: Callable[[str], np.ndarray], name: str, dtype=np.float32) -> np.ndarray:
    """The MXFP4 weight `name` as `[..., G*32, R]` in `dtype`: `NAME_blocks: u8[..., R, G, 16]`
    and `NAME_scales: u8[..., R, G]` read through `get(stored name)`, dequantized and with the
    last two axes swapped (what `transformers` gives for the in-memory parameter), one leading
    index (an expert) at a time, so float32 is never held for more than one."""
    blocks, scales = get(name + BLOCKS_SUFFIX), get(name + SCALES_SUFFIX)
    _check_pair(name, blocks.shape, scales.shape, (blocks.dtype, scales.dtype))
    out = np.empty(dequantized_shape(blocks.shape), dtype=dtype)  # [..., G*32, R]
    for index in np.ndindex(blocks.shape[:-3]):
        out[index] = dequantize(blocks[index], scales[index]).T  # [G*32, R]
    return out

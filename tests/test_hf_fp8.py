"""moe_jax.hf.fp8 and CheckpointReader's block-scaled FP8 weights against transformers'
dequantization: hand-computed values, a weight with partial edge blocks quantized here to
DeepSeek-V3's on-disk layout (written by safetensors.torch as torch.float8_e4m3fn, dtype
F8_E4M3) and read back bit for bit (float32 and bfloat16) against
`transformers.integrations.finegrained_fp8`'s `_dequantize_fp8_weight` (its CPU path that takes
partial blocks) and `Fp8Dequantize` (the `FineGrainedFP8Config(dequantize=True)` conversion, for
whole blocks), shapes from the headers alone, sharded checkpoints, refusals."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

from moe_jax.hf import files, fp8

WEIGHT = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
NORM = "model.layers.0.input_layernorm.weight"
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}


def f8(values) -> np.ndarray:
    return np.asarray(values, np.float32).astype(ml_dtypes.float8_e4m3fn)


def quantize(weight: torch.Tensor, block=(128, 128)):
    """DeepSeek-V3's FP8 of `weight: f32[R, C]`: (f8[R, C], scale_inv f32[ceil(R/b0),
    ceil(C/b1)]). Per block the scale is amax / 448 (E4M3's largest magnitude), the stored value
    weight / scale cast to float8_e4m3fn, and scale_inv the scale itself."""
    rows, cols = weight.shape
    scale = torch.empty(-(-rows // block[0]), -(-cols // block[1]))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            scale[i, j] = tile.abs().amax() / 448
    expanded = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return (weight / expanded[:rows, :cols]).to(torch.float8_e4m3fn), scale  # [R, C]


def random_weight(rows, cols, seed=0) -> torch.Tensor:
    """f32[rows, cols]: normal values, each 128 x 128 block at its own scale in 2**[-6, 6)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    exponents = torch.randint(-6, 6, (-(-rows // 128), -(-cols // 128)), generator=generator)
    exponents = exponents.repeat_interleave(128, 0).repeat_interleave(128, 1)
    return weight * 2.0 ** exponents[:rows, :cols]


def write(directory, tensors: dict, quantization_config=FP8_CONFIG):
    """A checkpoint of torch `tensors` in one model.safetensors, as the published ones are
    written; `quantization_config` None leaves it out of config.json."""
    safetensors.torch.save_file(tensors, str(directory / files.SINGLE_FILE), {"format": "pt"})
    config = {"model_type": "deepseek_v3"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (directory / files.CONFIG_FILE).write_text(json.dumps(config))


def bits(array) -> np.ndarray:
    """The bit patterns of a float32 or bfloat16 numpy array or torch tensor."""
    if isinstance(array, torch.Tensor):
        array = array.view(torch.int32 if array.dtype == torch.float32 else torch.int16).numpy()
    return array.view(np.uint32 if array.dtype.itemsize == 4 else np.uint16)


def test_dequantize_hand_computed():
    # blocks of 2 x 2 over [3, 3]: the last row and column are partial blocks
    weight = f8([[1.0, -2.0, 0.5], [448.0, 2.0**-9, -1.5], [3.0, 0.125, -0.0]])
    scale_inv = np.array([[2.0, 10.0], [0.5, 4.0]], np.float32)
    values = fp8.dequantize(weight, scale_inv, (2, 2))
    assert values.shape == (3, 3) and values.dtype == np.float32
    expected = [[2.0, -4.0, 5.0], [896.0, 2.0**-8, -15.0], [1.5, 0.0625, -0.0]]
    np.testing.assert_array_equal(values, expected)
    assert np.signbit(values[2, 2])
    # one block per row of 3 along the columns; bfloat16 rounds 3 * 0.1 (f32) once more
    values = fp8.dequantize(f8([[3.0, 1.0, 0.0]]), np.array([[0.1]], np.float32), (1, 3))
    np.testing.assert_array_equal(values, np.float32([[np.float32(3) * np.float32(0.1), 0.1, 0]]))
    values = fp8.dequantize(f8([[3.0]]), np.array([[0.1]], np.float32), (1, 3), ml_dtypes.bfloat16)
    assert values.dtype == ml_dtypes.bfloat16
    assert values[0, 0] == (np.float32(3) * np.float32(0.1)).astype(ml_dtypes.bfloat16)


def test_reader_hand_computed_with_the_configured_block(tmp_path):
    weight = torch.tensor([[1.0, -2.0, 0.5], [448.0, 0.25, -1.5]]).to(torch.float8_e4m3fn)
    scale_inv = torch.tensor([[2.0, 0.5]])  # one row of blocks of 2 x 2
    write(
        tmp_path,
        {"w": weight, "w_scale_inv": scale_inv},
        {**FP8_CONFIG, "weight_block_size": [2, 2]},
    )
    reader = files.CheckpointReader(str(tmp_path))
    assert reader.shapes == {"w": (2, 3)}
    values = reader.get("w")
    assert values.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(values, [[2.0, -4.0, 0.25], [896.0, 0.5, -0.75]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reader_matches_transformers_with_partial_blocks(tmp_path, dtype):
    original = random_weight(300, 260)
    weight, scale_inv = quantize(original)
    assert weight.dtype == torch.float8_e4m3fn and tuple(scale_inv.shape) == (3, 3)
    norm = torch.randn(300).to(torch.bfloat16)
    write(tmp_path, {WEIGHT: weight, WEIGHT + "_scale_inv": scale_inv, NORM: norm})
    np_dtype, torch_dtype = {
        "float32": (np.float32, torch.float32),
        "bfloat16": (ml_dtypes.bfloat16, torch.bfloat16),
    }[dtype]
    reader = files.CheckpointReader(str(tmp_path), dequantized_dtype=np_dtype)
    assert reader.shapes == {WEIGHT: (300, 260), NORM: (300,)}
    ours = reader.get(WEIGHT)
    assert ours.dtype == np_dtype and ours.shape == (300, 260)
    # transformers multiplies in float32, then rounds to the parameter's dtype (Fp8Dequantize)
    theirs = _dequantize_fp8_weight(weight, scale_inv, [128, 128], torch.float32).to(torch_dtype)
    np.testing.assert_array_equal(bits(ours), bits(theirs))
    # and the values are the weight quantized: E4M3 keeps 3 mantissa bits, 2**-9 * scale apart
    # from zero (subnormals)
    error = np.abs(ours.astype(np.float32) - original.numpy())
    scales = np.repeat(np.repeat(scale_inv.numpy(), 128, 0), 128, 1)[:300, :260]
    tolerance = np.abs(original.numpy()) * 2.0**-4 + scales * 2.0**-10
    if dtype == "bfloat16":
        tolerance += np.abs(original.numpy()) * 2.0**-8
    assert (error <= tolerance).all()
    np.testing.assert_array_equal(bits(reader.get(NORM)), bits(norm))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dequantize_matches_the_transformers_dequantize_conversion(dtype):
    """Fp8Dequantize (`FineGrainedFP8Config(dequantize=True)`) takes the block from the scales'
    shape, so only whole blocks: [256, 384] and leading expert axes."""
    weight, scale_inv = zip(*(quantize(random_weight(256, 384, seed)) for seed in range(2)))
    weight, scale_inv = torch.stack(weight), torch.stack(scale_inv)  # [2, 256, 384], [2, 2, 3]
    np_dtype, torch_dtype = {
        "float32": (np.float32, torch.float32),
        "bfloat16": (ml_dtypes.bfloat16, torch.bfloat16),
    }[dtype]
    theirs = Fp8Dequantize(None)._dequantize_one(weight, scale_inv, output_dtype=torch_dtype)
    weight_np = weight.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    ours = fp8.dequantize(weight_np, scale_inv.numpy(), (128, 128), np_dtype)
    assert ours.shape == (2, 256, 384)
    np.testing.assert_array_equal(bits(ours), bits(theirs))


def test_sharded_and_shapes_read_no_data(tmp_path, monkeypatch):
    weight, scale_inv = quantize(random_weight(300, 260, seed=1))
    tensors = {WEIGHT: weight.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)}
    tensors[WEIGHT + "_scale_inv"] = scale_inv.numpy()
    config = {"model_type": "deepseek_v3", "quantization_config": FP8_CONFIG}
    names = files.write_checkpoint(
        str(tmp_path),
        config,
        [(name, a.shape, a.dtype, lambda a=a: a) for name, a in tensors.items()],
        max_shard_bytes=1,
    )
    assert len(names) == 2
    expected = _dequantize_fp8_weight(weight, scale_inv, [128, 128], torch.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("dequantized")

    with monkeypatch.context() as patch:
        patch.setattr(fp8, "dequantize", refuse)
        reader = files.CheckpointReader(str(tmp_path), dequantized_dtype=np.float32)
        assert reader.shapes == {WEIGHT: (300, 260)}
        with pytest.raises(AssertionError, match="dequantized"):
            reader.get(WEIGHT)
    np.testing.assert_array_equal(bits(reader.get(WEIGHT)), bits(expected))


def test_reader_refuses_the_scale_names(tmp_path):
    weight, scale_inv = quantize(random_weight(130, 2))
    write(tmp_path, {WEIGHT: weight, WEIGHT + "_scale_inv": scale_inv})
    reader = files.CheckpointReader(str(tmp_path))
    with pytest.raises(ValueError, match=f"no tensor '{WEIGHT}_scale_inv' .*'{WEIGHT}', dequant"):
        reader.get(WEIGHT + "_scale_inv")


def fp8_zeros(*shape):
    return torch.zeros(shape).to(torch.float8_e4m3fn)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"w": fp8_zeros(4, 4)}, r"FP8 tensor 'w' has no scales 'w_scale_inv'"),
        ({"w_scale_inv": torch.ones(1, 1)}, r"FP8 scales 'w_scale_inv' have no weight 'w'"),
        (
            {"w": torch.zeros(4, 4), "w_scale_inv": torch.ones(1, 1)},
            r"'w' has dtype F32 and block scales 'w_scale_inv': the only scaled weights read "
            r"are float8_e4m3fn \(F8_E4M3\)",
        ),
        (
            {"w": fp8_zeros(4, 4).view(torch.float8_e5m2), "w_scale_inv": torch.ones(1, 1)},
            r"'w' has dtype F8_E5M2",
        ),
        (
            {"w": fp8_zeros(4, 4), "w_scale_inv": torch.ones(1, 1, dtype=torch.bfloat16)},
            r"scales 'w_scale_inv' have dtype BF16, not float32",
        ),
        (
            {"w": fp8_zeros(300, 260), "w_scale_inv": torch.ones(2, 2)},
            r"'w' \[300, 260\] and its scales 'w_scale_inv' \[2, 2\] disagree: .* blocks of "
            r"128 x 128 .*\[..., ceil\(R/128\), ceil\(C/128\)\]",
        ),
        (
            {"w": fp8_zeros(256), "w_scale_inv": torch.ones(2)},
            r"'w' \[256\] and its scales 'w_scale_inv' \[2\] disagree",
        ),
    ],
)
def test_reader_refusals(tmp_path, tensors, message):
    write(tmp_path, tensors)
    with pytest.raises(ValueError, match=message) as error:
        files.CheckpointReader(str(tmp_path))
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("block", [[128], [0, 128], None, "128", [128.0, 128], [True, 1]])
def test_reader_refuses_unknown_block_sizes(tmp_path, block):
    write(
        tmp_path,
        {"w": fp8_zeros(4, 4), "w_scale_inv": torch.ones(1, 1)},
        {"weight_block_size": block},
    )
    with pytest.raises(ValueError, match=r"weight_block_size is .*two positive integers"):
        files.CheckpointReader(str(tmp_path))


def test_block_size_defaults_to_128():
    assert fp8.block_size({}) == fp8.block_size({"quantization_config": None}) == (128, 128)
    assert fp8.block_size({"quantization_config": {"quant_method": "mxfp4"}}) == (128, 128)
    assert fp8.block_size({"quantization_config": {"weight_block_size": [64, 32]}}) == (64, 32)


def test_dequantize_refusals():
    scale = np.ones((1, 1), np.float32)
    with pytest.raises(ValueError, match="'weight' has dtype float32 and block scales"):
        fp8.dequantize(np.zeros((4, 4), np.float32), scale)
    with pytest.raises(ValueError, match="'weight_scale_inv' have dtype float16, not float32"):
        fp8.dequantize(f8(np.zeros((4, 4))), scale.astype(np.float16))
    with pytest.raises(ValueError, match=r"'q' \[4, 4\] and its scales 'q_scale_inv' \[1, 2\]"):
        fp8.dequantize(f8(np.zeros((4, 4))), np.ones((1, 2), np.float32), (4, 4), name="q")

"""moe_jax.hf.mxfp4 and CheckpointReader's MXFP4 weights against transformers' dequantization:
hand-computed values, tensors quantized here to gpt-oss's on-disk layout and read back (float32
and bfloat16, bit for bit, against `convert_moe_packed_tensors` and against the parameters of a
tiny GptOssForCausalLM loaded with `Mxfp4Config(dequantize=True)`), shapes from the headers
alone, refusals."""

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from moe_jax.hf import files, mxfp4

E, M, H = 3, 64, 32  # experts, model width, expert width
GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"


def e2m1_magnitudes() -> np.ndarray:
    """f32[8]: the magnitude of E2M1 codes 0..7 from their bits (exponent bias 1, 1 mantissa
    bit; exponent 0 is subnormal)."""
    codes = np.arange(8)
    exponent, mantissa = codes >> 1, codes & 1
    normal = 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return np.where(exponent == 0, mantissa / 2, normal).astype(np.float32)


def quantize(x: np.ndarray):
    """MXFP4 of `x: f32[..., R, K]` along its last axis: (blocks u8[..., R, K/32, 16], scales
    u8[..., R, K/32], the values they represent f32[..., R, K]). Per block of 32 the scale is
    2**(floor(log2(max |x|)) - 2) (OCP MX v1.0: E2M1's largest exponent is 2), 2**-127 for an
    all-zero block, and each value is rounded to the nearest E2M1 magnitude (6 at most)."""
    groups = x.reshape(*x.shape[:-1], -1, 32)  # [..., R, G, 32]
    amax = np.abs(groups).max(-1)  # [..., R, G]
    exponent = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127)
    scaled = groups / 2.0 ** exponent[..., None]
    magnitudes = e2m1_magnitudes()
    codes = np.abs(np.abs(scaled)[..., None] - magnitudes).argmin(-1)  # [..., R, G, 32]
    values = np.where(np.signbit(scaled), -magnitudes[codes], magnitudes[codes])
    codes = codes | np.signbit(scaled).astype(np.int64) << 3
    blocks = (codes[..., 0::2] | codes[..., 1::2] << 4).astype(np.uint8)  # [..., R, G, 16]
    scales = (exponent + 127).astype(np.uint8)
    values = (values * 2.0 ** exponent[..., None]).astype(np.float32)
    return blocks, scales, values.reshape(x.shape)  # [..., R, K]


def random_weight(rng, shape) -> np.ndarray:
    """f32[shape]: normal values, each block of 32 along the last axis at its own scale in
    2**[-8, 8); the first row's first block is zeros, the second row's holds -0.0 and small
    values."""
    x = rng.normal(size=shape).reshape(*shape[:-1], -1, 32)
    x *= 2.0 ** rng.integers(-8, 8, size=x.shape[:-1])[..., None]
    x[0, 0, 0] = 0.0
    x[0, 1, 0, :4] = [-0.0, 1e-3, -2e-3, 0.0]
    return x.reshape(shape).astype(np.float32)


def write(directory, tensors: dict, max_shard_bytes=files.DEFAULT_MAX_SHARD_BYTES):
    files.write_checkpoint(
        str(directory),
        {"model_type": "gpt_oss"},
        [(name, a.shape, a.dtype, lambda a=a: a) for name, a in tensors.items()],
        max_shard_bytes=max_shard_bytes,
    )


def gpt_oss_experts(tmp_path, rng):
    """A checkpoint with gpt-oss's MXFP4 expert weights, every tensor in a shard of its own;
    returns it and {stored name: array}, {presented name: the values quantized}."""
    # the stored [out, in] matrices: gate_up [E, 2H, M], down [E, M, H]
    stored = {GATE_UP: random_weight(rng, (E, 2 * H, M)), DOWN: random_weight(rng, (E, M, H))}
    tensors, expected = {}, {}
    for name, x in stored.items():
        blocks, scales, values = quantize(x)
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        expected[name] = values.transpose(0, 2, 1)  # [E, in, out]
    tensors[GATE_UP + "_bias"] = rng.normal(size=(E, 2 * H)).astype(np.float32)
    write(tmp_path, tensors, max_shard_bytes=1)
    return tensors, expected


def transformers_dequantized(tensors, name, dtype) -> np.ndarray:
    blocks = torch.from_numpy(tensors[name + "_blocks"])
    scales = torch.from_numpy(tensors[name + "_scales"])
    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


def test_dequantize_hand_computed():
    blocks = np.zeros((3, 16), np.uint8)
    # block 0, scale 2**1: 0x21 -> 0.5 (low nibble), 1.0 (high); 0xF8 -> -0.0, -6.0;
    # 0x7A -> -1.0, 6.0
    blocks[0, :3] = [0x21, 0xF8, 0x7A]
    blocks[1, 0] = 0x07  # scale 2**-127: 6.0, 0.0
    blocks[2, 0] = 0x21  # scale byte 255: NaN
    values = mxfp4.dequantize(blocks, np.array([128, 0, 255], np.uint8))
    assert values.shape == (96,) and values.dtype == np.float32
    np.testing.assert_array_equal(values[:6], [1.0, 2.0, -0.0, -12.0, -2.0, 12.0])
    assert np.signbit(values[2])
    np.testing.assert_array_equal(values[6:32], 0.0)
    np.testing.assert_array_equal(values[32:34], [6.0 * 2.0**-127, 0.0])
    np.testing.assert_array_equal(values[34:64], 0.0)
    assert np.isnan(values[64:]).all()


def test_read_transposes_hand_computed():
    stored = {
        "w_blocks": np.zeros((1, 2, 1, 16), np.uint8),  # [E, R, G, 16]
        "w_scales": np.array([[[127], [126]]], np.uint8),  # row 0: 2**0, row 1: 2**-1
    }
    stored["w_blocks"][0, :, 0, 0] = [0x21, 0x43]  # row 0: 0.5, 1.0; row 1: 1.5, 2.0
    assert mxfp4.find_pairs(
        {name: a.shape for name, a in stored.items()}, {"w_blocks": "U8", "w_scales": "U8"}
    ) == {"w": (1, 32, 2)}
    values = mxfp4.read(stored.__getitem__, "w")
    assert values.shape == (1, 32, 2)
    np.testing.assert_array_equal(values[0, :2], [[0.5, 0.75], [1.0, 1.0]])
    np.testing.assert_array_equal(values[0, 2:], 0.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reader_matches_transformers(tmp_path, dtype):
    tensors, expected = gpt_oss_experts(tmp_path, np.random.default_rng(0))
    np_dtype, torch_dtype, bits = {
        "float32": (np.float32, torch.float32, np.uint32),
        "bfloat16": (ml_dtypes.bfloat16, torch.bfloat16, np.uint16),
    }[dtype]
    reader = files.CheckpointReader(str(tmp_path), dequantized_dtype=np_dtype)
    assert reader.shapes == {GATE_UP: (E, M, 2 * H), DOWN: (E, H, M), GATE_UP + "_bias": (E, 2 * H)}
    for name in (GATE_UP, DOWN):
        ours = reader.get(name)
        assert ours.dtype == np_dtype and ours.shape == reader.shapes[name]
        theirs = transformers_dequantized(tensors, name, torch_dtype)
        theirs = theirs.view(torch.int32 if bits == np.uint32 else torch.int16).numpy()
        np.testing.assert_array_equal(ours.view(bits), theirs.view(bits))
        np.testing.assert_array_equal(ours.view(bits), expected[name].astype(np_dtype).view(bits))
    np.testing.assert_array_equal(reader.get(GATE_UP + "_bias"), tensors[GATE_UP + "_bias"])


def test_reader_matches_gpt_oss_loaded_by_transformers(tmp_path):
    config = transformers.GptOssConfig(
        vocab_size=64,
        hidden_size=M,
        intermediate_size=H,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=E,
        num_experts_per_tok=2,
        layer_types=["full_attention"],
    )
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    tensors = {}
    for name, param in transformers.GptOssForCausalLM(config).state_dict().items():
        if name not in (GATE_UP, DOWN):
            tensors[name] = param.detach().numpy()
            continue
        stored_shape = (E, param.shape[2], param.shape[1])  # [E, out, in]
        blocks, scales, _ = quantize(random_weight(rng, stored_shape))
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    config.quantization_config = {"quant_method": "mxfp4"}
    config.save_pretrained(tmp_path)
    safetensors.numpy.save_file(tensors, str(tmp_path / files.SINGLE_FILE), {"format": "pt"})
    model = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    reader = files.CheckpointReader(str(tmp_path), dequantized_dtype=np.float32)
    experts = model.model.layers[0].mlp.experts
    for name, param in ((GATE_UP, experts.gate_up_proj), (DOWN, experts.down_proj)):
        assert reader.shapes[name] == tuple(param.shape)
        theirs = param.detach().numpy().view(np.uint32)
        np.testing.assert_array_equal(reader.get(name).view(np.uint32), theirs)


def test_shapes_read_no_data(tmp_path, monkeypatch):
    gpt_oss_experts(tmp_path, np.random.default_rng(1))

    def refuse(*args, **kwargs):
        raise AssertionError("dequantized")

    monkeypatch.setattr(mxfp4, "dequantize", refuse)
    reader = files.CheckpointReader(str(tmp_path))
    assert reader.shapes[GATE_UP] == (E, M, 2 * H)
    with pytest.raises(AssertionError, match="dequantized"):
        reader.get(GATE_UP)


def u8(*shape):
    return np.zeros(shape, np.uint8)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"w_blocks": u8(2, 3, 16)}, r"'w_blocks' has no partner 'w_scales'.*download"),
        ({"w_scales": u8(2, 3)}, r"'w_scales' has no partner 'w_blocks'"),
        (
            {"w_blocks": u8(2, 3, 16), "w_scales": u8(2, 4)},
            r"'w_blocks' \[2, 3, 16\] and 'w_scales' \[2, 4\] disagree",
        ),
        (
            {"w_blocks": u8(2, 3, 16), "w_scales": np.zeros((2, 3), np.int8)},
            r"'w_scales' has dtype I8, not uint8.*Mxfp4Config\(dequantize=True\)",
        ),
        (
            {"w_blocks": np.zeros((2, 3, 16), np.float32), "w_scales": u8(2, 3)},
            r"'w_blocks' has dtype F32, not uint8",
        ),
        (
            {"w_blocks": u8(2, 3, 8), "w_scales": u8(2, 3)},
            r"'w_blocks' has shape \[2, 3, 8\]; the only layout known",
        ),
        ({"w_blocks": u8(3, 16), "w_scales": u8(3)}, r"'w_blocks' has shape \[3, 16\]"),
        (
            {"w": np.zeros((32, 2), np.float32), "w_blocks": u8(2, 1, 16), "w_scales": u8(2, 1)},
            r"'w' is stored both plainly and as MXFP4",
        ),
    ],
)
def test_reader_refusals(tmp_path, tensors, message):
    safetensors.numpy.save_file(tensors, str(tmp_path / files.SINGLE_FILE))
    (tmp_path / files.CONFIG_FILE).write_text("{}")
    with pytest.raises(ValueError, match=message) as error:
        files.CheckpointReader(str(tmp_path))
    assert str(tmp_path) in str(error.value)


def test_reader_refuses_the_stored_names(tmp_path):
    tensors, _ = gpt_oss_experts(tmp_path, np.random.default_rng(2))
    reader = files.CheckpointReader(str(tmp_path))
    with pytest.raises(ValueError, match=f"no tensor '{DOWN}_scales' .*'{DOWN}', dequantized"):
        reader.get(DOWN + "_scales")
    with pytest.raises(ValueError, match="no tensor 'nothing'.$"):
        reader.get("nothing")


def test_dequantize_refusals():
    with pytest.raises(ValueError, match="must be uint8, got int8 and uint8"):
        mxfp4.dequantize(np.zeros((2, 16), np.int8), u8(2))
    with pytest.raises(ValueError, match=r"blocks \[2, 16\] and scales \[3\]"):
        mxfp4.dequantize(u8(2, 16), u8(3))
    with pytest.raises(ValueError, match=r"blocks \[2, 8\] and scales \[2\]"):
        mxfp4.dequantize(u8(2, 8), u8(2))

"""The Hugging Face on-disk layout: `config.json` plus safetensors weights, whole or sharded.

A checkpoint directory holds `config.json` and either one `model.safetensors` or shards
`model-00001-of-0000N.safetensors` listed in `model.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}`).

`CheckpointReader` opens a directory, checks that every shard the index names exists, and reads
tensor shapes from the safetensors headers without loading data; `get(name)` then reads one
tensor (numpy, through `safetensors.safe_open`), so a conversion holds one tensor at a time.
A quantized weight is presented as the one tensor `NAME`, dequantized by `get` in the layout
`transformers` gives the in-memory parameter: MXFP4's `NAME_blocks` + `NAME_scales` (gpt-oss's
expert weights, `moe_jax.hf.mxfp4`; `u8[E, R, G, 16]` -> `[E, G*32, R]`) and block-scaled
FP8's `NAME` + `NAME_scale_inv` (DeepSeek-V3's linear weights, `moe_jax.hf.fp8`;
`f8[R, C]` -> `[R, C]`).
`write_checkpoint` writes tensors built one at a time into shards of at most `max_shard_bytes`,
holding at most one shard in memory, and writes the index when there is more than one shard.
Only `safetensors`, numpy and `ml_dtypes` are used: no torch.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from moe_jax.hf import fp8, mxfp4

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# safetensors dtypes numpy cannot name, read from the file's bytes (safetensors' numpy reader
# refuses them): the published Mixtral and OLMoE checkpoints are bfloat16, DeepSeek-V3's FP8
RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn}


def _shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def read_config(directory: str) -> dict:
    """The parsed `config.json` of the checkpoint directory `directory`."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{os.path.abspath(directory)} is not a Hugging Face checkpoint: it has no "
            f"{CONFIG_FILE} (download one with `huggingface-cli download ORG/NAME --local-dir "
            "DIR`)."
        )
    with open(config_path, encoding="utf-8") as file:
        return json.load(file)


class CheckpointReader:
    """Reads one Hugging Face checkpoint directory, one tensor at a time.

    Quantized weights are presented as the one tensor `NAME`, dequantized by `get` to
    `dequantized_dtype`; the names of their scales are not presented:

    - an MXFP4 pair `NAME_blocks: u8[..., R, G, 16]`, `NAME_scales: u8[..., R, G]` as
      `NAME: [..., G*32, R]` (the stored `[out, in]` matrix transposed, as `transformers`
      dequantizes it), e.g. gpt-oss's `...experts.gate_up_proj` as `[E, M, 2H]` and
      `...experts.down_proj` as `[E, H, M]`;
    - an FP8 weight `NAME: f8[..., R, C]` (float8_e4m3fn) with block scales
      `NAME_scale_inv: f32[..., ceil(R/b0), ceil(C/b1)]` as `NAME: [..., R, C]`, e.g.
      DeepSeek-V3's `...self_attn.kv_a_proj_with_mqa.weight` as `[576, 7168]` (scales
      `[5, 56]`); the blocks `(b0, b1)` are `config.json`'s
      `quantization_config.weight_block_size`, 128 x 128 when it has none.

    A quantized weight that is incomplete or not in its format's layout, or an FP8 block size
    that is not two positive integers, is refused (ValueError) when the reader opens.

    Attributes:
      directory: the checkpoint directory.
      config: the parsed `config.json`.
      shapes: {tensor name: shape} of every tensor, from the file headers.
      dequantized_dtype: the dtype `get` dequantizes quantized weights to (bfloat16 by default,
        which holds every MXFP4 value exactly; FP8 values times their float32 scales are
        rounded to it, float32 rounding them once).
    """

    def __init__(self, directory: str, *, dequantized_dtype=ml_dtypes.bfloat16):
        self.directory = os.path.abspath(directory)
        self.config = read_config(self.directory)
        self.dequantized_dtype = dequantized_dtype
        self._handles: dict[str, object] = {}
        self._file_of = self._tensor_files()
        stored_shapes, stored_dtypes = {}, {}
        for name, filename in self._file_of.items():
            tensor_slice = self._open(filename).get_slice(name)
            stored_shapes[name] = tuple(tensor_slice.get_shape())
            stored_dtypes[name] = tensor_slice.get_dtype()
        try:
            block = fp8.block_size(self.config)
            formats = (
                (mxfp4, mxfp4.find_pairs(stored_shapes, stored_dtypes), mxfp4.read),
                (
                    fp8,
                    fp8.find_pairs(stored_shapes, stored_dtypes, block),
                    functools.partial(fp8.read, block=block),
                ),
            )
        except ValueError as error:
            raise ValueError(f"{self.directory}: {error}") from None
        # {NAME: read(get stored, NAME, dtype)} and {stored scale or block name: NAME}
        self._quantized: dict[str, Callable[..., np.ndarray]] = {}
        self._parts: dict[str, str] = {}
        for module, pairs, read in formats:
            for name in pairs:
                self._quantized[name] = read
                self._parts.update({name + suffix: name for suffix in module.SUFFIXES})
        self.shapes: dict[str, tuple[int, ...]] = {
            name: shape for name, shape in stored_shapes.items() if name not in self._parts
        }
        for _, pairs, _ in formats:
            self.shapes.update(pairs)

    def _tensor_files(self) -> dict[str, str]:
        """{tensor name: file name}; checks that every file exists."""
        index_path = os.path.join(self.directory, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as file:
                weight_map = json.load(file).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path} has no 'weight_map' of tensor names to shards.")
            for filename in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(self.directory, filename)):
                    raise ValueError(
                        f"{index_path} names the shard {filename!r}, which is missing from "
                        f"{self.directory}; download the complete checkpoint."
                    )
            return dict(weight_map)
        single = os.path.join(self.directory, SINGLE_FILE)
        if not os.path.isfile(single):
            raise ValueError(
                f"{self.directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors "
                "checkpoints are read (convert a pytorch_model.bin with transformers first)."
            )
        return {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}

    def _open(self, filename: str):
        if filename not in self._handles:
            path = os.path.join(self.directory, filename)
            try:
                self._handles[filename] = safe_open(path, framework="np")
            except SafetensorError as error:
                raise ValueError(
                    f"{path} is not a readable safetensors file ({error}): it is truncated or "
                    "damaged, as an interrupted download leaves it; download it again."
                ) from None
        return self._handles[filename]

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` (a key of `shapes`) as a numpy array (read from disk now). bfloat16
        tensors (the published Mixtral and OLMoE checkpoints), which numpy cannot name, come back
        as `ml_dtypes.bfloat16` arrays; quantized weights come back dequantized to
        `dequantized_dtype` (`mxfp4.read`, `fp8.read`)."""
        if name in self._quantized:
            return self._quantized[name](self._stored, name, self.dequantized_dtype)
        if name not in self.shapes:
            hint = (
                f" (read the quantized weight {self._parts[name]!r}, dequantized)"
                if name in self._parts
                else ""
            )
            raise ValueError(f"{self.directory} has no tensor {name!r}{hint}.")
        return self._stored(name)

    def _stored(self, name: str) -> np.ndarray:
        """The stored tensor `name` as it is on disk; a dtype of `RAW_DTYPES` is read from the
        file's bytes at the offsets its header gives."""
        filename = self._file_of[name]
        handle = self._open(filename)
        dtype = handle.get_slice(name).get_dtype()
        if dtype not in RAW_DTYPES:
            return handle.get_tensor(name)
        with open(os.path.join(self.directory, filename), "rb") as file:
            (header_bytes,) = struct.unpack("<Q", file.read(8))
            entry = json.loads(file.read(header_bytes))[name]
            begin, end = entry["data_offsets"]
            file.seek(8 + header_bytes + begin)
            data = np.fromfile(file, dtype=np.uint8, count=end - begin)
        return data.view(RAW_DTYPES[dtype]).reshape(entry["shape"])

    def close(self) -> None:
        self._handles.clear()


def _nbytes(shape: tuple[int, ...], dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def write_checkpoint(
    directory: str,
    config: dict,
    tensors: Iterable[tuple[str, tuple[int, ...], object, Callable[[], np.ndarray]]],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Writes `config.json` and the weights into `directory`; returns the weight files written.

    `tensors` lists `(name, shape, dtype, build)`; `build()` makes the tensor when its shard is
    written (one shard in memory at a time). Shards hold at most `max_shard_bytes` (a tensor
    larger than that gets a shard of its own); one shard is `model.safetensors`, more are
    `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}.")
    tensors = list(tensors)
    shards: list[list] = [[]]
    shard_bytes = 0
    for entry in tensors:
        size = _nbytes(entry[1], entry[2])
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += size
    os.makedirs(directory, exist_ok=True)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [_shard_name(i + 1, len(shards)) for i in range(len(shards))]
    )
    weight_map = {}
    for filename, shard in zip(names, shards):
        arrays = {}
        for name, shape, dtype, build in shard:
            array = np.ascontiguousarray(build(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name!r} was built as {array.shape}, declared {shape}.")
            arrays[name] = array
            weight_map[name] = filename
        save_file(arrays, os.path.join(directory, filename), metadata={"format": "pt"})
        del arrays
    stale = [INDEX_FILE] if len(shards) == 1 else [SINGLE_FILE]
    for filename in stale:
        if os.path.exists(os.path.join(directory, filename)):
            os.remove(os.path.join(directory, filename))
    if len(shards) > 1:
        total = sum(_nbytes(shape, dtype) for _, shape, dtype, _ in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as file:
            json.dump(index, file, indent=2, sort_keys=True)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, sort_keys=True)
    return names

"""Hugging Face checkpoints in and out: `config, model = moe_jax.hf.load(DIR)`,
`moe_jax.hf.save(config, model, DIR)`.

A checkpoint directory is what `transformers`' `save_pretrained` writes: `config.json` plus
`model.safetensors`, or shards `model-0000k-of-0000n.safetensors` with
`model.safetensors.index.json` (`moe_jax.hf.files`). Only `safetensors` and numpy are used at run
time; tensors are read and written one at a time, so converting never holds two copies of a
model. `load` builds the model with `model.scan_layers=False`; `load_into` (what
`--config.train.init_from=hf:DIR` calls) and `save` also accept scanned models.

Families, keyed by the `model_type` of `config.json` (`moe_jax.hf.family`): `t5` (T5 v1.0/v1.1,
`moe_jax.hf.t5`), `switch_transformers` (`moe_jax.hf.switch`), and `mixtral`, `olmoe`,
`qwen2_moe` and `qwen3_moe` (`moe_jax.hf.rope_decoder`, our `model.kind='rope_decoder'`), and
`gpt_oss` (`moe_jax.hf.gpt_oss`, the same decoder with sinks, sliding windows and biases),
`deepseek_v2` and `deepseek_v3` (`moe_jax.hf.deepseek`, with multi-head latent attention). A
family is an object with

- `model_type: str`;
- `to_moe_config(hf_config: dict, tensor_names: frozenset[str]) -> dict`: moe_jax settings as
  dotted keys (`{'model.d_model': 768, 'moe.num_experts': 8, ...}`) written over the default
  config; raises ValueError naming any `config.json` field it cannot express;
- `load_plan(hf_config, config, tensor_names) -> LoadPlan`: `tensors` {HF name: shape} of every
  tensor the checkpoint must hold; `params` {moe_jax parameter path: `build(get)`} where
  `get(hf_name) -> np.ndarray` reads one tensor, so a builder can stack per-expert tensors
  (`...experts.{j}.w1.weight` -> `[E, M, H]`), split a fused one (`experts.gate_up_proj`
  `[E, 2H, M]` -> `wi_gate`, `wi`), transpose, reshape heads and scale; `ignored` names that may
  be present and are unused. Missing tensors (named) and wrong shapes (named, both shapes) are
  reported before any parameter is built; so is any tensor neither expected nor ignored;
- `save_plan(config) -> SavePlan`: `config` (the `config.json` dict) and `tensors`
  {HF name: (shape, `build(param)`)} where `param(path) -> np.ndarray` reads one moe_jax
  parameter (several tensors may read one parameter, one tensor may join several); raises
  ValueError naming any moe_jax setting it cannot express, before anything is written.

Parameter paths are those of the model built with `scan_layers=False`
(`('decoder', 'segments', s, r, 'layers', j, 'ffn', 'wi')`); `family.layer_paths(config,
stack, num_layers)` lists each layer's prefix. `t5.TensorMap` collects the rules of both
directions at once (`linear`, `attention`, `stacked`, `direct`) and can serve other families.
Register a new family with `family.register(obj)` and import its module below.

`config.model.hf_model_type` records the family a loaded model came from, which `save` writes
again (set it to save a model trained from scratch).
"""

from moe_jax.hf import deepseek, gpt_oss, rope_decoder, switch, t5  # noqa: F401  (importing a family registers it)
from moe_jax.hf.family import family_names, get_family, register
from moe_jax.hf.loading import init_from, load, load_config, load_into, save

__all__ = [
    "family_names",
    "get_family",
    "init_from",
    "load",
    "load_config",
    "load_into",
    "register",
    "save",
]

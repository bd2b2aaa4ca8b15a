"""The `gpt_oss` family (gpt-oss-20b, gpt-oss-120b): our `model.kind='rope_decoder'` with
attention sinks, sliding-window layers, YaRN rotary scaling, biased attention, a biased router
and biased experts with a clamped SwiGLU.

transformers' GPT-OSS (`models/gpt_oss/modeling_gpt_oss.py`, 5.x) against moe_jax; what it
shares with the other Llama-style decoders (pre-norm RMSNorms, GQA, the "rotate half" rotary
layout, `[out, in]` linears, untied head) is in `moe_jax.hf.rope_decoder`, whose tensor map
this family extends:

- Attention: biases on q, k, v and o when `attention_bias` (`model.qkv_bias`,
  `model.attention_out_bias`); `self_attn.sinks: [N]`, one logit per query head in its
  softmax's denominator (`model.attention_sinks`). `layer_types` lists 'sliding_attention' and
  'full_attention' per layer; the sliding ones attend to the last `sliding_window` positions
  (`model.sliding_window`). We express the layer types that repeat with a period n, full
  attention at layers `i % n == n - 1` (`model.full_attention_every`; the releases alternate,
  n = 2), and refuse others by name.
- Rotary positions with `rope_parameters` (YaRN in the releases: `model.rope_type='yarn'` and
  its fields, `moe_jax.hf.rope_decoder`).
- Router `mlp.router.weight: [E, M]` with `mlp.router.bias: [E]` (our router `kernel` and
  `logit_bias`),
  top-k of its logits and a softmax over the k chosen, which is our `tokens_choose` with
  `moe.normalize='topk'` (the softmax over all experts renormalised over the k).
- Experts `mlp.experts.gate_up_proj: [E, M, 2H]` (already `[in, out]`; gate and up interleaved
  along the last axis: gate at even columns, up at odd), `gate_up_proj_bias: [E, 2H]`,
  `down_proj: [E, H, M]`, `down_proj_bias: [E, M]`: our `wi_gate`, `wi`, `wo` and their biases
  (`moe.expert_bias`). They compute `(clip(up, -l, l) + 1) * g * sigmoid(alpha g)` with
  `g = min(gate, l)`, `l = swiglu_limit`, `alpha = swiglu_alpha` (`moe.activation=
  'swiglu_clamped'`). The published checkpoints store the two expert weights as MXFP4 blocks and
  scales, which `moe_jax.hf.files` dequantizes as it reads them.
- Every layer has experts; no dense FFN, no q/k norm, no z-loss. `router_aux_loss_coef` is
  `loss.aux_coef`; transformers' pooled load-balancing loss is the Switch form, as for Mixtral.
- Refused: `hidden_act` other than silu, attention dropout, layer types without a period.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_jax.hf.family import check_fields, check_settings, register
from moe_jax.hf.rope_decoder import RopeDecoderFamily, _rope_settings
from moe_jax.hf.t5 import TensorMap
from moe_jax.rope import ROPE_TYPES
from moe_jax.rope_attention import sliding_layers
from moe_jax.stack import sparse_layer_flags

SLIDING, FULL = "sliding_attention", "full_attention"


def full_attention_period(layer_types: list[str], window: int | None) -> tuple[int, int]:
    """(`model.sliding_window`, `model.full_attention_every`) of a `layer_types` list.

    The period n is the smallest with full attention exactly at the layers `i % n == n - 1`
    (0: every layer slides; no window when no layer does). Raises ValueError naming the list
    when no period expresses it, or when layers slide without a `sliding_window`.
    """
    unknown = set(layer_types) - {SLIDING, FULL}
    if unknown:
        raise ValueError(
            f"gpt_oss config.json: layer_types has {sorted(unknown)}; moe_jax reads "
            f"{SLIDING!r} and {FULL!r} only."
        )
    slides = [kind == SLIDING for kind in layer_types]
    if not any(slides):
        return 0, 0
    if not window or window < 1:
        raise ValueError(
            f"gpt_oss config.json: sliding_window={window!r} with sliding layers in "
            "layer_types; a sliding layer needs a window of >= 1 positions."
        )
    count = len(slides)
    for period in range(count + 1):
        if slides == [period == 0 or i % period != period - 1 for i in range(count)]:
            return int(window), period
    raise ValueError(
        f"gpt_oss config.json: layer_types={layer_types} is not supported by moe_jax: it "
        "expresses full attention every n-th layer (model.full_attention_every), the others "
        "sliding."
    )


class GptOssFamily(RopeDecoderFamily):
    """`gpt_oss` (see the module docstring)."""

    def __init__(self):
        super().__init__("gpt_oss")

    def to_moe_config(self, hf: dict, tensor_names: frozenset[str]) -> dict[str, Any]:
        check_fields(
            self.model_type,
            hf,
            {
                "hidden_act": lambda v: v == "silu",
                "attention_dropout": lambda v: v == 0,
            },
        )
        d_model = hf.get("hidden_size", 2880)
        num_heads = hf.get("num_attention_heads", 64)
        num_layers = hf.get("num_hidden_layers", 36)
        layer_types = hf.get("layer_types") or [
            FULL if i % 2 else SLIDING for i in range(num_layers)
        ]
        if len(layer_types) != num_layers:
            raise ValueError(
                f"gpt_oss config.json: layer_types has {len(layer_types)} entries for "
                f"num_hidden_layers={num_layers}."
            )
        window, every = full_attention_period(layer_types, hf.get("sliding_window", 128))
        biased = bool(hf.get("attention_bias", True))
        return {
            "model.kind": "rope_decoder",
            "model.vocab_size": hf.get("vocab_size", 201_088),
            "model.d_model": d_model,
            "model.num_layers": num_layers,
            "model.num_heads": num_heads,
            "model.num_kv_heads": hf.get("num_key_value_heads") or num_heads,
            "model.head_dim": hf.get("head_dim") or d_model // num_heads,
            "model.d_ff": hf.get("intermediate_size", 2880),
            "model.ffn_activation": "swiglu",
            "model.norm_epsilon": float(hf.get("rms_norm_eps", 1e-5)),
            **_rope_settings(self.model_type, hf, 150_000.0),
            "model.qk_norm": False,
            "model.qk_norm_per_head": False,
            "model.qkv_bias": biased,
            "model.attention_out_bias": biased,
            "model.attention_sinks": True,
            "model.sliding_window": window,
            "model.full_attention_every": every,
            "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "model.dropout_rate": 0.0,
            "moe.num_experts": hf.get("num_local_experts", 128),
            "moe.k": hf.get("num_experts_per_tok", 4),
            "moe.router": "tokens_choose",
            "moe.decoder_router": "",
            "moe.normalize": "topk",
            "moe.d_ff": hf.get("intermediate_size", 2880),
            "moe.activation": "swiglu_clamped",
            "moe.swiglu_limit": float(hf.get("swiglu_limit", 7.0)),
            "moe.swiglu_alpha": float(hf.get("swiglu_alpha", 1.702)),
            "moe.expert_bias": True,
            "moe.router_bias": True,
            "moe.backend": "dropless",
            "moe.router_jitter": 0.0,
            "moe.num_shared_experts": 0,
            "moe.shared_expert_gate": False,
            "moe.extra_dense_ffn": False,
            "moe.sparse_placement": "every",
            "moe.sparse_every": 1,
            "moe.num_sparse_layers": 0,
            "moe.dense_layers": (),
            "loss.aux_coef": float(hf.get("router_aux_loss_coef", 0.001)),
            "loss.z_coef": 0.0,
        }

    def _check_expressible(self, config) -> None:
        model, moe = config.model, config.moe
        biased = bool(model.qkv_bias)
        check_settings(
            self.model_type,
            {
                "model.kind": (model.kind, ("rope_decoder",)),
                "model.rope_type": (model.rope_type, ROPE_TYPES),
                "model.qk_norm": (bool(model.qk_norm), (False,)),
                "model.attention_sinks": (bool(model.attention_sinks), (True,)),
                "model.attention_out_bias": (bool(model.attention_out_bias), (biased,)),
                "moe.router": (moe.router, ("tokens_choose",)),
                "moe.normalize": (moe.normalize, ("topk",)),
                "moe.activation": (moe.activation, ("swiglu_clamped",)),
                "moe.expert_bias": (bool(moe.expert_bias), (True,)),
                "moe.router_bias": (bool(moe.router_bias), (True,)),
                "moe.num_shared_experts": (moe.num_shared_experts, (0,)),
                "moe.extra_dense_ffn": (moe.extra_dense_ffn, (False,)),
            },
        )
        if moe.num_experts < 1 or not all(sparse_layer_flags(model.num_layers, moe)):
            raise ValueError(
                "a gpt_oss checkpoint has experts in every layer: set moe.num_experts >= 1, "
                "moe.sparse_placement='every' and moe.sparse_every=1."
            )

    def _hf_config(self, config) -> dict[str, Any]:
        model, moe = config.model, config.moe
        sliding = sliding_layers(model.num_layers, model)
        return {
            **self._shared_hf_config(config),
            "intermediate_size": moe.d_ff or model.d_ff,
            "head_dim": model.head_dim,
            "attention_bias": bool(model.qkv_bias),
            "sliding_window": model.sliding_window or None,
            "layer_types": [SLIDING if slides else FULL for slides in sliding],
            "num_local_experts": moe.num_experts,
            "swiglu_limit": moe.swiglu_limit,
            "swiglu_alpha": moe.swiglu_alpha,
        }

    def _sparse_ffn(self, tensors: TensorMap, prefix: str, path: tuple, config, *, fused: bool):
        """Router and experts, each with biases; gate and up interleaved in `gate_up_proj`."""
        m, e = config.model.d_model, config.moe.num_experts
        h = config.moe.d_ff or config.model.d_ff
        tensors.linear(f"{prefix}.mlp.router.weight", (*path, "router", "kernel"), m, e)
        tensors.copy(f"{prefix}.mlp.router.bias", (*path, "router", "logit_bias"), (e,))
        experts = f"{prefix}.mlp.experts"
        gate_up, gate_up_bias = f"{experts}.gate_up_proj", f"{experts}.gate_up_proj_bias"
        for name, shape in ((gate_up, (e, m, 2 * h)), (gate_up_bias, (e, 2 * h))):
            tensors.shapes[name] = shape
            tensors.tensors[name] = (shape, _interleaver(path, name == gate_up))
        tensors.params[(*path, "wi_gate")] = lambda get: get(gate_up)[..., 0::2]  # [E, M, H]
        tensors.params[(*path, "wi")] = lambda get: get(gate_up)[..., 1::2]
        tensors.params[(*path, "bi_gate")] = lambda get: get(gate_up_bias)[..., 0::2]  # [E, H]
        tensors.params[(*path, "bi")] = lambda get: get(gate_up_bias)[..., 1::2]
        tensors.copy(f"{experts}.down_proj", (*path, "wo"), (e, h, m))
        tensors.copy(f"{experts}.down_proj_bias", (*path, "bo"), (e, m))


def _interleaver(path: tuple, weights: bool):
    """Writes our gate and up weights (`wi_gate`, `wi`: [E, M, H]) or biases ([E, H]) as one
    tensor with gate at even and up at odd positions of its last axis."""
    gate, up = ("wi_gate", "wi") if weights else ("bi_gate", "bi")

    def theirs(param) -> np.ndarray:
        gates, ups = np.asarray(param((*path, gate))), np.asarray(param((*path, up)))
        return np.stack([gates, ups], axis=-1).reshape(*gates.shape[:-1], -1)  # [..., 2H]

    return theirs


GPT_OSS = register(GptOssFamily())

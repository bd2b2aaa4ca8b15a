"""The `deepseek_v2` and `deepseek_v3` families (DeepSeek-V2, V2-Lite, V3): our
`model.kind='rope_decoder'` with multi-head latent attention, dense first layers, shared experts
and DeepSeek's routers.

transformers' DeepSeek-V2 and V3 (`models/deepseek_v{2,3}/modeling_deepseek_v{2,3}.py`, 5.x)
against moe_jax; the layer skeleton (pre-norm RMSNorms, final norm, untied head, per-expert or
fused SwiGLU experts, dense SwiGLU layers of `intermediate_size`) is `moe_jax.hf.rope_decoder`'s:

- Attention: multi-head latent attention (`model.attention='mla'`, `moe_jax.latent_attention`):
  `q_a_proj` -> `q_a_layernorm` -> `q_b_proj` (or `q_proj` when `q_lora_rank` is null, as in
  V2-Lite: `model.q_lora_rank=0`), `kv_a_proj_with_mqa` giving the `kv_lora_rank` latent and
  the shared `qk_rope_head_dim` key, `kv_a_layernorm`, `kv_b_proj` giving each head's
  `qk_nope_head_dim` key and `v_head_dim` value, `o_proj`. Linears are `[out, in]`; our
  `wq_down: [M, Rq]`, `wq_up: [Rq, N, Dn + Dr]` (or `wq: [M, N, Dn + Dr]`), `wkv_down:
  [M, R + Dr]`, `wkv_up: [R, N, Dn + Dv]`, `wo: [N, Dv, M]`. The checkpoints' rotary features
  pair `(2i, 2i + 1)` (V2 always, V3 with `rope_interleave`, its default and the only setting
  read here); ours pair `(i, i + Dr/2)`, so the rope columns of the query heads and of the
  shared key are reordered on load (`latent_attention.interleaved_to_halves`) and back on save.
- Rotary positions from `rope_parameters` (YaRN with `mscale` and `mscale_all_dim` in the
  releases: the softmax scale gains `m(factor, mscale_all_dim)**2`, `moe_jax.rope`).
- Layers `i < first_k_dense_replace` have a dense SwiGLU of `intermediate_size`
  (`moe.dense_layers`); the others `n_routed_experts` experts of `moe_intermediate_size` and
  `n_shared_experts` shared ones (`mlp.shared_experts`, one SwiGLU of their summed width:
  `moe.num_shared_experts`), with no gate on the shared output.
- Routing. V3 (`topk_method='noaux_tc'`): sigmoid affinities, `mlp.gate.e_score_correction_bias`
  added for the choice only, groups scored by the sum of their two best biased affinities
  (`n_group`, `topk_group`), weights renormalised when `norm_topk_prob`, times
  `routed_scaling_factor`: our `moe.router='aux_free'` with `moe.num_groups`, `moe.topk_groups`,
  `moe.routed_scaling`, the correction bias its `RouterBias`. V2: softmax, `topk_method`
  'greedy' (top-k) or 'group_limited_greedy' (groups scored by their best probability), the
  raw probabilities times `routed_scaling_factor` (transformers' V2 router never renormalises,
  whatever `norm_topk_prob` says): our `tokens_choose` with the same fields. Dropless, as
  transformers computes.
- Losses: V2's `aux_loss_alpha` with `seq_aux` is the balancing loss per sequence
  (`loss.aux_scope='sequence'`); V3 balances with the bias and DeepSeek-V3's sequence-wise loss
  at alpha 1e-4 (its Sec. 4.2; transformers computes no auxiliary loss). No router z-loss.
- Refused: multi-token prediction (V3's `num_nextn_predict_layers`: the checkpoint's layer
  `model.layers.{num_hidden_layers}` is named and refused at load), `moe_layer_freq` != 1,
  attention or MLP biases, a non-SiLU activation, V3 scoring other than sigmoid, V2 scoring
  other than softmax, V3 without `norm_topk_prob`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_jax.hf.family import LoadPlan, check_fields, check_settings, register
from moe_jax.hf.rope_decoder import RopeDecoderFamily, _rope_settings
from moe_jax.hf.t5 import TensorMap
from moe_jax.latent_attention import interleaved_to_halves
from moe_jax.rope import ROPE_TYPES
from moe_jax.stack import sparse_layer_flags

_V2_METHODS = ("greedy", "group_limited_greedy")
# transformers' defaults (V3's DeepseekV3Config, V2's DeepseekV2Config) of the fields a
# config.json may leave out
_DEFAULTS = {
    "deepseek_v3": dict(
        vocab_size=129_280,
        hidden_size=7168,
        intermediate_size=18_432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        first_k_dense_replace=3,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
    ),  # fmt: skip
    "deepseek_v2": dict(
        vocab_size=102_400,
        hidden_size=4096,
        intermediate_size=11_008,
        moe_intermediate_size=1407,
        num_hidden_layers=32,
        num_attention_heads=32,
        n_shared_experts=2,
        n_routed_experts=64,
        routed_scaling_factor=1.0,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        n_group=None,
        topk_group=None,
        num_experts_per_tok=None,
        first_k_dense_replace=0,
        norm_topk_prob=False,
        rms_norm_eps=1e-6,
    ),  # fmt: skip
}


class DeepseekFamily(RopeDecoderFamily):
    """`deepseek_v2` or `deepseek_v3` (see the module docstring)."""

    def __init__(self, model_type: str):
        super().__init__(model_type)
        self.v3 = model_type == "deepseek_v3"

    def to_moe_config(self, hf: dict, tensor_names: frozenset[str]) -> dict[str, Any]:
        fields = {
            "hidden_act": lambda v: v == "silu",
            "attention_bias": lambda v: v is False,
            "mlp_bias": lambda v: v is False,
            "attention_dropout": lambda v: v == 0,
            "moe_layer_freq": lambda v: v == 1,
            "pretraining_tp": lambda v: v == 1,
        }
        if self.v3:
            fields["scoring_func"] = lambda v: v == "sigmoid"
            fields["topk_method"] = lambda v: v == "noaux_tc"
            fields["rope_interleave"] = lambda v: v is True  # the releases' layout (docstring)
            # our aux_free router always renormalises its k weights, as the releases do
            fields["norm_topk_prob"] = lambda v: v is True
        else:
            fields["scoring_func"] = lambda v: v == "softmax"
            fields["topk_method"] = lambda v: v in _V2_METHODS
        check_fields(self.model_type, hf, fields)
        value = {**_DEFAULTS[self.model_type], **{k: v for k, v in hf.items() if v is not None}}
        missing = [key for key, v in value.items() if v is None]
        if missing:
            raise ValueError(f"{self.model_type} config.json: set {missing} (no default here).")
        grouped = self.v3 or hf.get("topk_method", "greedy") == "group_limited_greedy"
        num_layers, num_heads = value["num_hidden_layers"], value["num_attention_heads"]
        shared = value["n_shared_experts"]
        return {
            "model.kind": "rope_decoder",
            "model.attention": "mla",
            "model.vocab_size": value["vocab_size"],
            "model.d_model": value["hidden_size"],
            "model.num_layers": num_layers,
            "model.num_heads": num_heads,
            "model.num_kv_heads": num_heads,
            # null (V2-Lite) projects the queries directly
            "model.q_lora_rank": hf.get("q_lora_rank", value["q_lora_rank"]) or 0,
            "model.kv_lora_rank": value["kv_lora_rank"],
            "model.qk_rope_head_dim": value["qk_rope_head_dim"],
            "model.qk_nope_head_dim": value["qk_nope_head_dim"],
            "model.v_head_dim": value["v_head_dim"],
            "model.d_ff": value["intermediate_size"],
            "model.ffn_activation": "swiglu",
            "model.norm_epsilon": float(value["rms_norm_eps"]),
            **_rope_settings(self.model_type, hf, 10_000.0),
            "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "model.dropout_rate": 0.0,
            "moe.num_experts": value["n_routed_experts"],
            "moe.k": value["num_experts_per_tok"],
            "moe.router": "aux_free" if self.v3 else "tokens_choose",
            "moe.decoder_router": "",
            "moe.normalize": "topk" if self.v3 else "none",
            "moe.num_groups": value["n_group"] if grouped else 1,
            "moe.topk_groups": value["topk_group"] if grouped else 1,
            "moe.routed_scaling": float(value["routed_scaling_factor"]),
            "moe.d_ff": value["moe_intermediate_size"],
            "moe.activation": "swiglu",
            "moe.backend": "dropless",
            "moe.router_jitter": 0.0,
            "moe.num_shared_experts": shared,
            "moe.shared_expert_gate": False,
            "moe.extra_dense_ffn": False,
            "moe.sparse_placement": "every",
            "moe.sparse_every": 1,
            "moe.num_sparse_layers": 0,
            "moe.dense_layers": tuple(range(min(value["first_k_dense_replace"], num_layers))),
            "loss.aux_coef": 1e-4 if self.v3 else float(hf.get("aux_loss_alpha", 0.001)),
            "loss.aux_scope": "sequence" if self.v3 or hf.get("seq_aux", True) else "group",
            "loss.z_coef": 0.0,
        }

    def _check_expressible(self, config) -> None:
        model, moe = config.model, config.moe
        router = "aux_free" if self.v3 else "tokens_choose"
        check_settings(
            self.model_type,
            {
                "model.kind": (model.kind, ("rope_decoder",)),
                "model.attention": (model.attention, ("mla",)),
                "model.ffn_activation": (model.ffn_activation, ("swiglu",)),
                "model.rope_type": (model.rope_type, ROPE_TYPES),
                "model.sliding_window": (model.sliding_window, (0,)),
                "moe.router": (moe.router, (router,)),
                "moe.activation": (moe.activation, ("", "swiglu")),
                "moe.normalize": (moe.normalize, ("topk",) if self.v3 else ("none",)),
                "moe.shared_expert_gate": (bool(moe.shared_expert_gate), (False,)),
                "moe.expert_bias": (bool(moe.expert_bias), (False,)),
                "moe.router_bias": (bool(moe.router_bias), (False,)),
                "moe.extra_dense_ffn": (moe.extra_dense_ffn, (False,)),
                "moe.max_expert_shards": (moe.max_expert_shards, (0,)),
            },
        )
        flags = sparse_layer_flags(model.num_layers, moe)
        first_sparse = flags.index(True) if True in flags else model.num_layers
        if moe.num_experts < 1 or any(flags[first_sparse:]) != all(flags[first_sparse:]):
            raise ValueError(
                f"a {self.model_type} checkpoint has dense layers only before its first sparse "
                f"one (first_k_dense_replace), then experts in every layer; this config's "
                f"layers are {['sparse' if f else 'dense' for f in flags]}."
            )

    def _hf_config(self, config) -> dict[str, Any]:
        model, moe = config.model, config.moe
        flags = sparse_layer_flags(model.num_layers, moe)
        hf = self._shared_hf_config(config)
        hf.update(
            {
                "intermediate_size": model.d_ff,
                "moe_intermediate_size": moe.d_ff or model.d_ff,
                "num_key_value_heads": model.num_heads,
                "q_lora_rank": model.q_lora_rank or None,
                "kv_lora_rank": model.kv_lora_rank,
                "qk_rope_head_dim": model.qk_rope_head_dim,
                "qk_nope_head_dim": model.qk_nope_head_dim,
                "v_head_dim": model.v_head_dim,
                "head_dim": model.qk_rope_head_dim,
                "n_routed_experts": moe.num_experts,
                "n_shared_experts": moe.num_shared_experts,
                "n_group": moe.num_groups,
                "topk_group": moe.topk_groups,
                "routed_scaling_factor": moe.routed_scaling,
                "norm_topk_prob": self.v3,
                "first_k_dense_replace": flags.index(True) if True in flags else model.num_layers,
                "attention_bias": False,
            }
        )
        if self.v3:
            hf.update({"rope_interleave": True, "num_nextn_predict_layers": 0})
        else:
            method = "group_limited_greedy" if moe.num_groups > 1 else "greedy"
            hf.update({"topk_method": method, "aux_loss_alpha": config.loss.aux_coef})
            hf["seq_aux"] = config.loss.aux_scope == "sequence"
        return hf

    def _attention(self, tensors: TensorMap, prefix: str, attention: tuple, model) -> None:
        """The latent attention's linears and norms; the rope columns reordered (docstring)."""
        m, n = model.d_model, model.num_heads
        latent, rope = model.kv_lora_rank, model.qk_rope_head_dim
        nope, value = model.qk_nope_head_dim, model.v_head_dim
        query = nope + rope
        order = interleaved_to_halves(rope)  # checkpoint's rope column for each of ours
        back = np.argsort(order)

        def heads(w: np.ndarray, columns) -> np.ndarray:
            """`w: [..., N, Dn + Dr]` with each head's rope columns taken in `columns`."""
            return np.concatenate([w[..., :nope], w[..., nope:][..., columns]], axis=-1)

        if model.q_lora_rank:
            rank = model.q_lora_rank
            tensors.linear(f"{prefix}.q_a_proj.weight", (*attention, "wq_down"), m, rank)
            tensors.copy(f"{prefix}.q_a_layernorm.weight", (*attention, "q_norm", "scale"), (rank,))
            tensors.direct(
                f"{prefix}.q_b_proj.weight",
                (*attention, "wq_up"),
                (n * query, rank),
                lambda w: heads(w.T.reshape(rank, n, query), order),  # [Rq, N, Dq]
                lambda w: heads(w, back).reshape(rank, n * query).T,  # [N*Dq, Rq]
            )
        else:
            tensors.direct(
                f"{prefix}.q_proj.weight",
                (*attention, "wq"),
                (n * query, m),
                lambda w: heads(w.T.reshape(m, n, query), order),  # [M, N, Dq]
                lambda w: heads(w, back).reshape(m, n * query).T,  # [N*Dq, M]
            )

        def shared_key(w: np.ndarray, columns) -> np.ndarray:
            """`w: [M, R + Dr]` with the shared key's rope columns taken in `columns`."""
            return np.concatenate([w[:, :latent], w[:, latent:][:, columns]], axis=1)

        tensors.direct(
            f"{prefix}.kv_a_proj_with_mqa.weight",
            (*attention, "wkv_down"),
            (latent + rope, m),
            lambda w: shared_key(w.T, order),  # [M, R + Dr]
            lambda w: shared_key(w, back).T,  # [R + Dr, M]
        )
        tensors.copy(f"{prefix}.kv_a_layernorm.weight", (*attention, "kv_norm", "scale"), (latent,))
        tensors.direct(
            f"{prefix}.kv_b_proj.weight",
            (*attention, "wkv_up"),
            (n * (nope + value), latent),
            lambda w: w.T.reshape(latent, n, nope + value),  # [R, N, Dn + Dv]
            lambda w: w.reshape(latent, n * (nope + value)).T,  # [N*(Dn+Dv), R]
        )
        tensors.direct(
            f"{prefix}.o_proj.weight",
            (*attention, "wo"),
            (m, n * value),
            lambda w: w.T.reshape(n, value, m),  # [N, Dv, M]
            lambda w: w.reshape(n * value, m).T,  # [M, N*Dv]
        )

    def _sparse_ffn(self, tensors: TensorMap, prefix: str, path: tuple, config, *, fused: bool):
        """Router (V3: and its correction bias), routed experts, the shared experts."""
        model, moe = config.model, config.moe
        m, e = model.d_model, moe.num_experts
        tensors.linear(f"{prefix}.mlp.gate.weight", (*path, "router", "kernel"), m, e)
        if self.v3:
            bias = f"{prefix}.mlp.gate.e_score_correction_bias"
            tensors.copy(bias, (*path, "router", "bias"), (e,))
        self._experts(tensors, prefix, path, config, fused=fused)
        if moe.num_shared_experts:
            width = moe.num_shared_experts * (moe.d_ff or model.d_ff)
            self._swiglu(tensors, f"{prefix}.mlp.shared_experts", (*path, "shared"), m, width)

    def load_plan(self, hf: dict, config, tensor_names: frozenset[str]) -> LoadPlan:
        extra_layer = f"model.layers.{config.model.num_layers}."
        prediction = sorted(name for name in tensor_names if name.startswith(extra_layer))
        if prediction:
            raise ValueError(
                f"{self.model_type}: the checkpoint holds a multi-token prediction layer "
                f"({prediction[0]}, ... {len(prediction)} tensors under {extra_layer}*), which "
                "moe_jax does not implement; load a checkpoint without it (drop those tensors "
                "and set num_nextn_predict_layers to 0)."
            )
        return super().load_plan(hf, config, tensor_names)


DEEPSEEK_V2 = register(DeepseekFamily("deepseek_v2"))
DEEPSEEK_V3 = register(DeepseekFamily("deepseek_v3"))

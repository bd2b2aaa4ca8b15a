"""The `switch_transformers` family (Switch Transformer, Fedus et al. 2022), T5 layout plus experts.

transformers' Switch (`models/switch_transformers/modeling_switch_transformers.py`, 5.x) against
moe_jax, beyond the T5 layout of `moe_jax.hf.t5`:

- Router: float32 `classifier` (no bias; `router_bias=True` is refused), softmax, top-1, the
  combine weight is the raw top-1 probability: our tokens_choose with k=1, normalize='none'.
  Training multiplies the router input by uniform noise in `[1 - eps, 1 + eps]`
  (`router_jitter_noise`), as our `moe.router_jitter`.
- Capacity: transformers routes each sequence as one group and gives every expert exactly
  `expert_capacity` slots, filled in position order; we load that as `moe.group_size=0` (one
  group per sequence) and `moe.expert_capacity`. Padding takes slots in transformers (its
  `router_ignore_padding_tokens` is unused) and none here; with right padding, padding comes
  after every real token in position order, so the real tokens' slots agree.
- A token dropped by capacity gets zero from the layer (its residual carries it) in
  transformers 5 and here, as in the paper. transformers 4.x instead passed the dropped token's
  hidden state through, scaled by its router probability; checkpoints are the same, logits of
  dropping batches differ from 4.x.
- Sparse layers: layer i of a stack is sparse when `i % step == 1` (or `step == 1`) with
  `step` the stack's `encoder_sparse_step` / `decoder_sparse_step`: `SwitchTransformersConfig`
  derives it as `num_layers // num_sparse_*_layers`, but a step stored in config.json replaces
  that (and may disagree with the counts), so we read the stored step when there is one. We
  write the counts, from which transformers derives our steps. We find the
  `moe.sparse_placement` that puts experts in the same layers of both stacks, and refuse
  patterns we cannot place (our single placement serves both stacks; our 'every' puts experts
  at `i % n == n - 1`, which equals transformers' only for steps 1 and 2).
- Dense FFNs and experts are `wi`/`wo` with `dense_act_fn` 'relu' or 'gelu_new' (tanh GELU);
  transformers applies `dropout_rate` to the expert hidden layer as well, loaded as
  `moe.expert_dropout` (Switch fine-tunes with 0.4 there: set it after loading).
- Auxiliary losses: transformers concatenates the router logits of a stack's sparse layers
  along the sequence axis and computes one load-balancing loss and one z-loss per stack over
  all tokens, padding included (per sequence for the balancing loss), and reports both as 0 for
  a stack whose `sparse_step` is 1 (every layer sparse). moe_jax computes them per layer and
  routing group over real tokens only and sums them over layers (T5X, ST-MoE). The coefficients
  `router_aux_loss_coef`, `router_z_loss_coef` load as `loss.aux_coef`, `loss.z_coef`
  unchanged, so the totals differ by that normalisation.
- Embeddings: tied (`tie_word_embeddings=True`, the published checkpoints) is our
  `tie_embeddings=True` with the `d_model ** -0.5` rescale. Untied, transformers 5 keeps
  separate `encoder.embed_tokens` and `decoder.embed_tokens` tables; we share one, so they must
  equal `shared.weight`, and the head is an unscaled `lm_head`.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np

from moe_jax import routing
from moe_jax.hf.family import LoadPlan, SavePlan, check_fields, check_settings, register
from moe_jax.hf.t5 import TensorMap, add_stacks, common_config, common_hf_config, dense_ffn
from moe_jax.stack import PLACEMENTS, sparse_layer_flags

ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
DENSE_ACT_FN = {"relu": "relu", "gelu": "gelu_new"}
_EMBED_TOKENS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def count_sparse_step(num_layers: int, num_sparse: int) -> int:
    """The sparse step `SwitchTransformersConfig` derives from a stack's counts."""
    return num_layers // num_sparse if num_sparse > 0 else num_layers


def hf_sparse_step(hf: dict, stack: str, num_layers: int) -> int:
    """transformers' `{stack}_sparse_step` of a `num_layers` stack: the field of config.json when
    it is there (transformers' modeling code builds the stack from it, whatever the counts
    say), else derived from `num_sparse_{stack}_layers` (default 3)."""
    step = hf.get(f"{stack}_sparse_step")
    if step is None:
        return count_sparse_step(num_layers, hf.get(f"num_sparse_{stack}_layers", 3))
    return step


def hf_sparse_flags(num_layers: int, step: int) -> tuple[bool, ...]:
    """transformers' sparse layers of a stack with sparse step `step` (True: sparse), bottom to
    top: layer i is sparse when `i % step == 1` or `step == 1`; none when `step <= 0`."""
    return tuple((i % step == 1 or step == 1) if step > 0 else False for i in range(num_layers))


def _placements(num_layers: int):
    """Every moe placement setting for a stack of `num_layers` (or fewer) layers."""
    for every in range(1, num_layers + 1):
        yield {"sparse_placement": "every", "sparse_every": every, "num_sparse_layers": 0}
    for placement in PLACEMENTS[1:]:
        for count in range(1, num_layers + 1):
            yield {"sparse_placement": placement, "sparse_every": 2, "num_sparse_layers": count}


def _our_flags(placement: dict, num_layers: int) -> tuple[bool, ...] | None:
    moe = types.SimpleNamespace(num_experts=1, dense_layers=(), **placement)
    try:
        return sparse_layer_flags(num_layers, moe)
    except ValueError:
        return None


class SwitchFamily:
    """`model_type='switch_transformers'` (see the module docstring)."""

    model_type = "switch_transformers"

    def to_moe_config(self, hf: dict, tensor_names: frozenset[str]) -> dict[str, Any]:
        check_fields(
            self.model_type,
            hf,
            {
                "router_bias": lambda v: v is False,
                "router_dtype": lambda v: v == "float32",
                "dense_act_fn": lambda v: v in ACTIVATIONS,
                "encoder_sparse_step": lambda v: type(v) is int,
                "decoder_sparse_step": lambda v: type(v) is int,
            },
        )
        settings = common_config(self.model_type, hf)
        num_encoder = settings["model.num_encoder_layers"]
        num_decoder = settings["model.num_decoder_layers"]
        steps = (
            hf_sparse_step(hf, "encoder", num_encoder),
            hf_sparse_step(hf, "decoder", num_decoder),
        )
        wanted = (hf_sparse_flags(num_encoder, steps[0]), hf_sparse_flags(num_decoder, steps[1]))
        if not any(wanted[0] + wanted[1]):
            counts = ", ".join(
                f"num_sparse_{stack}_layers={hf.get(f'num_sparse_{stack}_layers', 3)}"
                for stack in ("encoder", "decoder")
            )
            raise ValueError(
                f"switch_transformers config.json puts experts in no layer: encoder_sparse_step="
                f"{steps[0]} and decoder_sparse_step={steps[1]} for {num_encoder} and "
                f"{num_decoder} layers ({counts}); a Switch Transformer needs experts: set both "
                "steps to 2 (every other layer, as the published checkpoints) or 1 (every layer). "
                "transformers derives a step as num_layers // num_sparse_*_layers, 0 when the "
                "count exceeds the layers."
            )
        placement = next(
            (
                candidate
                for candidate in _placements(max(num_encoder, num_decoder))
                if (_our_flags(candidate, num_encoder), _our_flags(candidate, num_decoder))
                == wanted
            ),
            None,
        )
        if placement is None:
            raise ValueError(
                f"switch_transformers config.json: num_sparse_encoder_layers="
                f"{hf.get('num_sparse_encoder_layers', 3)} and num_sparse_decoder_layers="
                f"{hf.get('num_sparse_decoder_layers', 3)} (encoder_sparse_step={steps[0]}, "
                f"decoder_sparse_step={steps[1]}) put experts in layers "
                f"{[i for i, s in enumerate(wanted[0]) if s]} (encoder) and "
                f"{[i for i, s in enumerate(wanted[1]) if s]} (decoder), which moe_jax's one "
                "sparse placement for both stacks cannot express."
            )
        dropout = settings["model.dropout_rate"]
        settings.update(
            {
                "model.ffn_activation": ACTIVATIONS[hf.get("dense_act_fn", "relu")],
                "model.tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
                "moe.num_experts": hf.get("num_experts", 8),
                "moe.k": 1,
                "moe.router": "tokens_choose",
                "moe.decoder_router": "",
                "moe.normalize": "none",
                "moe.batch_prioritized": False,
                "moe.d_ff": 0,
                "moe.activation": "",
                "moe.num_shared_experts": 0,
                "moe.extra_dense_ffn": False,
                "moe.expert_capacity": hf.get("expert_capacity", 64),
                "moe.group_size": 0,
                "moe.router_jitter": float(hf.get("router_jitter_noise", 0.01)),
                "moe.expert_dropout": dropout,
                "loss.aux_coef": float(hf.get("router_aux_loss_coef", 0.001)),
                "loss.z_coef": float(hf.get("router_z_loss_coef", 0.001)),
            }
        )
        settings.update({f"moe.{key}": value for key, value in placement.items()})
        return settings

    def _tensors(self, config) -> TensorMap:
        model, moe = config.model, config.moe
        m, h, e = model.d_model, model.d_ff, moe.num_experts
        flags = {
            "encoder": sparse_layer_flags(model.num_encoder_layers, moe),
            "decoder": sparse_layer_flags(model.num_decoder_layers, moe),
        }

        def feed_forward(tensors, prefix, path, index, stack):
            mlp = f"{prefix}.mlp"
            if not flags[stack][index]:
                dense_ffn(tensors, mlp, path, config, {"wi": "wi", "wo": "wo"})
                return
            tensors.linear(f"{mlp}.router.classifier.weight", (*path, "router", "kernel"), m, e)
            for ours, shape in (("wi", (h, m)), ("wo", (m, h))):
                names = [f"{mlp}.experts.expert_{j}.{ours}.weight" for j in range(e)]
                tensors.stacked(names, (*path, ours), shape, np.transpose, np.transpose)

        tensors = TensorMap()
        tensors.copy("shared.weight", ("embed", "embedding"), (model.vocab_size, m))
        add_stacks(tensors, config, feed_forward)
        return tensors

    def load_plan(self, hf: dict, config, tensor_names: frozenset[str]) -> LoadPlan:
        tensors = self._tensors(config)
        if config.model.tie_embeddings:
            return tensors.load_plan({"lm_head.weight", *_EMBED_TOKENS})
        present = [name for name in _EMBED_TOKENS if name in tensor_names]

        def embedding(get) -> np.ndarray:
            shared = get("shared.weight")
            for name in present:
                if not np.array_equal(get(name), shared):
                    raise ValueError(
                        f"switch_transformers checkpoint: {name} differs from shared.weight; "
                        "moe_jax shares one embedding table between encoder and decoder."
                    )
            return shared

        tensors.params[("embed", "embedding")] = embedding
        model = config.model
        tensors.linear("lm_head.weight", ("output", "kernel"), model.d_model, model.vocab_size)
        return tensors.load_plan(present)

    def save_plan(self, config) -> SavePlan:
        model, moe = config.model, config.moe
        self._check_expressible(config)
        encoder_count = self._sparse_count(config, model.num_encoder_layers)
        decoder_count = self._sparse_count(config, model.num_decoder_layers)
        capacity = moe.expert_capacity or routing.expert_capacity(
            moe.group_size or config.train.seq_len,
            moe.num_experts,
            moe.capacity_factor_eval,
            min_capacity=moe.min_capacity,
        )
        hf = common_hf_config(config)
        hf.update(
            {
                "model_type": self.model_type,
                "architectures": ["SwitchTransformersForConditionalGeneration"],
                "num_experts": moe.num_experts,
                "expert_capacity": capacity,
                "num_sparse_encoder_layers": encoder_count,
                "num_sparse_decoder_layers": decoder_count,
                "router_bias": False,
                "router_dtype": "float32",
                "router_ignore_padding_tokens": True,
                "router_jitter_noise": moe.router_jitter,
                "router_aux_loss_coef": config.loss.aux_coef,
                "router_z_loss_coef": config.loss.z_coef,
                "dense_act_fn": DENSE_ACT_FN[model.ffn_activation],
                "tie_word_embeddings": bool(model.tie_embeddings),
            }
        )
        tensors = self._tensors(config)
        if not model.tie_embeddings:
            for name in _EMBED_TOKENS:
                tensors.copy(name, ("embed", "embedding"), (model.vocab_size, model.d_model))
            tensors.linear("lm_head.weight", ("output", "kernel"), model.d_model, model.vocab_size)
        return SavePlan(config=hf, tensors=tensors.tensors)

    def _check_expressible(self, config) -> None:
        model, moe = config.model, config.moe
        required = {
            "model.ffn_activation": (model.ffn_activation, tuple(DENSE_ACT_FN)),
            "moe.k": (moe.k, (1,)),
            "moe.router": (moe.router, ("tokens_choose",)),
            "moe.decoder_router": (moe.decoder_router, ("", "tokens_choose")),
            "moe.normalize": (moe.normalize, ("none",)),
            "moe.batch_prioritized": (moe.batch_prioritized, (False,)),
            "moe.activation": (moe.activation, ("", model.ffn_activation)),
            "moe.d_ff": (moe.d_ff, (0, model.d_ff)),
            "moe.num_shared_experts": (moe.num_shared_experts, (0,)),
            "moe.extra_dense_ffn": (moe.extra_dense_ffn, (False,)),
        }
        check_settings(self.model_type, required)
        if moe.num_experts < 1:
            raise ValueError("moe.num_experts=0: save a dense encoder-decoder as t5.")

    def _sparse_count(self, config, num_layers: int) -> int:
        """`num_sparse_*_layers` that makes transformers place experts where we do."""
        ours = sparse_layer_flags(num_layers, config.moe)
        for count in range(1, num_layers + 1):
            if hf_sparse_flags(num_layers, count_sparse_step(num_layers, count)) == ours:
                return count
        raise ValueError(
            f"moe.sparse_placement={config.moe.sparse_placement!r} (sparse_every="
            f"{config.moe.sparse_every}, num_sparse_layers={config.moe.num_sparse_layers}) puts "
            f"experts in layers {[i for i, s in enumerate(ours) if s]} of a {num_layers}-layer "
            "stack; transformers' Switch places them at i % step == 1 (every layer, or every "
            "other from layer 1): use sparse_every=1 or 2."
        )


register(SwitchFamily())

"""The `t5` family (T5 v1.0 and v1.1) and the T5 layout that `switch_transformers` shares.

transformers' T5 (`models/t5/modeling_t5.py`) against moe_jax's encoder-decoder:

- Attention logits are not scaled by `1 / sqrt(d_kv)` in T5 (its initialiser absorbs it); ours
  are, so loading multiplies `q` by `sqrt(d_kv)` and saving divides it out.
- Linear weights are `[out, in]`: `q.weight: [N*D, M]` is our `wq: [M, N, D]` transposed and
  reshaped; `o.weight: [M, N*D]` is our `wo: [N, D, M]`.
- One relative position bias table per stack, in block 0's self-attention; the decoder's
  cross-attention has none (an old checkpoint may carry an unused one: ignored).
- RMSNorm epsilon `layer_norm_epsilon` -> `model.norm_epsilon`.
- Feed-forward `feed_forward_proj`: 'relu' (v1.0) -> relu; 'gated-gelu' (v1.1; transformers'
  `gelu_new`, the tanh approximation, as `jax.nn.gelu`) -> gated-gelu, with `wi_0` the gate
  (our `wi_gate`) and `wi_1` the linear unit (our `wi`); 'gated-silu' -> swiglu; 'gelu_new' ->
  gelu. 'gelu' (erf) and other activations are refused.
- Output head. transformers 5 always ties T5's `lm_head` to `shared` unless the checkpoint
  holds a different `lm_head.weight`, and rescales the decoder output by `d_model ** -0.5` when
  `scale_decoder_outputs` (default: `tie_word_embeddings` of the file) is set. Tied and scaled
  is our `tie_embeddings=True`; any other combination loads as an untied kernel (the head
  tensor, transposed, with the scale folded in) and saves as an explicit `lm_head.weight` with
  `tie_word_embeddings=False`.
- Padding: our encoder treats token id 0 as padding and our decoder starts from id 0, so
  `pad_token_id` and `decoder_start_token_id` must be 0 (as in every T5 checkpoint).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moe_jax.hf.family import LoadPlan, SavePlan, check_fields, layer_paths, register

# feed_forward_proj -> moe_jax activation
ACTIVATIONS = {
    "relu": "relu",
    "gelu_new": "gelu",
    "gated-gelu": "gated-gelu",
    "gated-gelu_new": "gated-gelu",
    "gated-silu": "swiglu",
}
# moe_jax activation -> feed_forward_proj written on save
FEED_FORWARD_PROJ = {
    "relu": "relu",
    "gelu": "gelu_new",
    "gated-gelu": "gated-gelu",
    "swiglu": "gated-silu",
}


# ------------------------------------------------------------------------- shared T5 pieces


def common_config(model_type: str, hf: dict) -> dict[str, Any]:
    """moe_jax settings of the attention, norms, sizes and ids every T5-layout family shares."""
    check_fields(
        model_type,
        hf,
        {
            "is_encoder_decoder": lambda v: v is True,
            "pad_token_id": lambda v: v == 0,
            "decoder_start_token_id": lambda v: v in (None, 0),
        },
    )
    num_layers = hf.get("num_layers", 6 if model_type == "t5" else 12)
    num_decoder_layers = hf.get("num_decoder_layers") or num_layers
    return {
        "model.kind": "encoder_decoder",
        "model.vocab_size": hf.get("vocab_size", 32128),
        "model.d_model": hf.get("d_model", 512 if model_type == "t5" else 768),
        "model.head_dim": hf.get("d_kv", 64),
        "model.d_ff": hf.get("d_ff", 2048),
        "model.num_heads": hf.get("num_heads", 8 if model_type == "t5" else 12),
        "model.num_encoder_layers": num_layers,
        "model.num_decoder_layers": num_decoder_layers,
        "model.relative_attention_num_buckets": hf.get("relative_attention_num_buckets", 32),
        "model.relative_attention_max_distance": hf.get("relative_attention_max_distance", 128),
        "model.norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-6)),
        "model.dropout_rate": float(hf.get("dropout_rate", 0.1)),
    }


def common_hf_config(config) -> dict[str, Any]:
    """The config.json fields of the T5 layout from a moe_jax config (refusing what T5 lacks)."""
    model = config.model
    if model.kind != "encoder_decoder":
        raise ValueError(
            f"model.kind={model.kind!r}: the T5 layout is an encoder-decoder; save a decoder-only "
            "model as another family."
        )
    return {
        "is_encoder_decoder": True,
        "vocab_size": model.vocab_size,
        "d_model": model.d_model,
        "d_kv": model.head_dim,
        "d_ff": model.d_ff,
        "num_heads": model.num_heads,
        "num_layers": model.num_encoder_layers,
        "num_decoder_layers": model.num_decoder_layers,
        "relative_attention_num_buckets": model.relative_attention_num_buckets,
        "relative_attention_max_distance": model.relative_attention_max_distance,
        "layer_norm_epsilon": model.norm_epsilon,
        "dropout_rate": model.dropout_rate,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "use_cache": True,
    }


def _attention_names(prefix: str) -> dict[str, str]:
    return {ours: f"{prefix}.{theirs}.weight" for ours, theirs in zip("qkvo", "qkvo")}


class TensorMap:
    """Collects, per HF tensor, its shape, how to load it and how to save it.

    `load` and `save` rules are added together so the two directions stay each other's inverse.
    """

    def __init__(self):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.params: dict = {}
        self.tensors: dict = {}

    def direct(self, name: str, path: tuple, shape: tuple[int, ...], to_ours, to_theirs) -> None:
        """One HF tensor <-> one parameter: `ours = to_ours(theirs)`, `theirs = to_theirs(ours)`."""
        self.shapes[name] = shape
        self.params[path] = lambda get: to_ours(get(name))
        self.tensors[name] = (shape, lambda param: to_theirs(param(path)))

    def copy(self, name: str, path: tuple, shape: tuple[int, ...]) -> None:
        self.direct(name, path, shape, np.asarray, np.asarray)

    def linear(self, name: str, path: tuple, d_in: int, d_out: int) -> None:
        """HF `[out, in]` Linear weight <-> our `[in, out]` kernel."""
        self.direct(name, path, (d_out, d_in), np.transpose, np.transpose)

    def attention(self, prefix: str, path: tuple, config) -> None:
        """q, k, v, o of one T5 attention; folds T5's missing `1/sqrt(D)` into `q`."""
        model = config.model
        m, n, d = model.d_model, model.num_heads, model.head_dim
        root = math.sqrt(d)
        names = _attention_names(prefix)
        for key in "qkv":
            scale = root if key == "q" else 1.0
            self.direct(
                names[key],
                (*path, f"w{key}"),
                (n * d, m),
                lambda w, s=scale: w.T.reshape(m, n, d) * s,  # [M, N, D]
                lambda w, s=scale: (w / s).reshape(m, n * d).T,  # [N*D, M]
            )
        self.direct(
            names["o"],
            (*path, "wo"),
            (m, n * d),
            lambda w: w.T.reshape(n, d, m),  # [N, D, M]
            lambda w: w.reshape(n * d, m).T,  # [M, N*D]
        )

    def stacked(self, names: list[str], path: tuple, shape: tuple[int, ...], to_ours, to_theirs):
        """One HF tensor per expert <-> one stacked `[E, ...]` parameter."""
        for name in names:
            self.shapes[name] = shape
        self.params[path] = lambda get: np.stack([to_ours(get(name)) for name in names])
        for index, name in enumerate(names):
            self.tensors[name] = (shape, lambda param, i=index: to_theirs(param(path)[i]))

    def load_plan(self, ignored=frozenset()) -> LoadPlan:
        return LoadPlan(tensors=self.shapes, params=self.params, ignored=frozenset(ignored))


def add_stacks(tensors: TensorMap, config, feed_forward) -> None:
    """Every tensor of both stacks; `feed_forward(tensors, prefix, path, layer_index, stack)`
    adds the FFN of one layer (`prefix` is its HF module name, `path` our layer path)."""
    model = config.model
    m = model.d_model
    for stack, num_layers in (
        ("encoder", model.num_encoder_layers),
        ("decoder", model.num_decoder_layers),
    ):
        ff = 2 if stack == "decoder" else 1
        bias_name = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        shape = (model.relative_attention_num_buckets, model.num_heads)
        tensors.copy(bias_name, (stack, "position_bias", "embedding"), shape)
        for index, path in enumerate(layer_paths(config, stack, num_layers)):
            block = f"{stack}.block.{index}.layer"
            tensors.copy(f"{block}.0.layer_norm.weight", (*path, "self_norm", "scale"), (m,))
            tensors.attention(f"{block}.0.SelfAttention", (*path, "self_attention"), config)
            if stack == "decoder":
                tensors.copy(f"{block}.1.layer_norm.weight", (*path, "cross_norm", "scale"), (m,))
                tensors.attention(f"{block}.1.EncDecAttention", (*path, "cross_attention"), config)
            tensors.copy(f"{block}.{ff}.layer_norm.weight", (*path, "ffn_norm", "scale"), (m,))
            feed_forward(tensors, f"{block}.{ff}", (*path, "ffn"), index, stack)
        tensors.copy(f"{stack}.final_layer_norm.weight", (stack, "final_norm", "scale"), (m,))


def dense_ffn(tensors: TensorMap, prefix: str, path: tuple, config, names: dict[str, str]):
    """A dense FFN; `names` maps our `wi`, `wi_gate`, `wo` to HF module names under `prefix`."""
    m, h = config.model.d_model, config.model.d_ff
    tensors.linear(f"{prefix}.{names['wi']}.weight", (*path, "wi"), m, h)
    if "wi_gate" in names:
        tensors.linear(f"{prefix}.{names['wi_gate']}.weight", (*path, "wi_gate"), m, h)
    tensors.linear(f"{prefix}.{names['wo']}.weight", (*path, "wo"), h, m)


def unscaled_head_kernel(head: np.ndarray, scale: bool, d_model: int) -> np.ndarray:
    """Our untied `[M, V]` kernel from an HF `[V, M]` head, with the output rescale folded in."""
    return head.T * (d_model**-0.5 if scale else 1.0)  # [M, V]


# ---------------------------------------------------------------------------------- t5


def _t5_head(hf: dict, tensor_names: frozenset[str]) -> tuple[bool, str]:
    """(scale_decoder_outputs, name of the head tensor) as transformers 5 reads them."""
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    return bool(scale), "lm_head.weight" if "lm_head.weight" in tensor_names else "shared.weight"


class T5Family:
    """`model_type='t5'`: dense T5 v1.0 / v1.1 (see the module docstring)."""

    model_type = "t5"

    def to_moe_config(self, hf: dict, tensor_names: frozenset[str]) -> dict[str, Any]:
        proj = hf.get("feed_forward_proj", "relu")
        if proj not in ACTIVATIONS:
            raise ValueError(
                f"t5 config.json: feed_forward_proj={proj!r} is not supported by moe_jax; it "
                f"reads {tuple(ACTIVATIONS)} ('gelu' is the exact erf GELU, ours is the tanh one)."
            )
        scale, head = _t5_head(hf, tensor_names)
        settings = common_config(self.model_type, hf)
        settings.update(
            {
                "model.ffn_activation": ACTIVATIONS[proj],
                "model.tie_embeddings": scale and head == "shared.weight",
                "moe.num_experts": 0,
            }
        )
        return settings

    def _feed_forward(self, config):
        gated = config.model.ffn_activation in ("gated-gelu", "swiglu")
        names = {"wi": "wi_1", "wi_gate": "wi_0", "wo": "wo"} if gated else {"wi": "wi", "wo": "wo"}

        def add(tensors, prefix, path, index, stack):
            dense_ffn(tensors, f"{prefix}.DenseReluDense", path, config, names)

        return add

    def _tensors(self, config) -> TensorMap:
        model = config.model
        tensors = TensorMap()
        tensors.copy("shared.weight", ("embed", "embedding"), (model.vocab_size, model.d_model))
        add_stacks(tensors, config, self._feed_forward(config))
        return tensors

    def load_plan(self, hf: dict, config, tensor_names: frozenset[str]) -> LoadPlan:
        tensors = self._tensors(config)
        ignored = {
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
        }
        if not config.model.tie_embeddings:
            scale, head = _t5_head(hf, tensor_names)
            d_model = config.model.d_model
            tensors.shapes[head] = (config.model.vocab_size, d_model)
            tensors.params[("output", "kernel")] = lambda get: unscaled_head_kernel(
                get(head), scale, d_model
            )
        else:
            ignored.add("lm_head.weight")
        return tensors.load_plan(ignored)

    def save_plan(self, config) -> SavePlan:
        model = config.model
        if config.moe.num_experts:
            raise ValueError(
                f"moe.num_experts={config.moe.num_experts}: a t5 checkpoint is dense; save a "
                "sparse encoder-decoder as switch_transformers."
            )
        hf = common_hf_config(config)
        hf.update(
            {
                "model_type": "t5",
                "architectures": ["T5ForConditionalGeneration"],
                "feed_forward_proj": FEED_FORWARD_PROJ[model.ffn_activation],
                "tie_word_embeddings": bool(model.tie_embeddings),
                "scale_decoder_outputs": bool(model.tie_embeddings),
            }
        )
        tensors = self._tensors(config)
        if not model.tie_embeddings:
            tensors.linear("lm_head.weight", ("output", "kernel"), model.d_model, model.vocab_size)
        return SavePlan(config=hf, tensors=tensors.tensors)


register(T5Family())

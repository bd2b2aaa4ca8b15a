"""Model FLOPs of a config: what a step must compute, counted from the architecture.

Forward FLOPs are 2 per multiply-add of every active matmul: per token and layer the attention
projections (queries and outputs `2 M N D` each, keys and values `2 M K D` each, K the key/value
heads), the attention scores and context (`2 x 2 L N D` against L keys, causal ones counted in full
as XLA computes them; with `model.attention='mla'` the latent attention's projections, `wkv_up`
applied once per token, and scores and context of widths `Dn + Dr` and `Dv`), the dense FFN (`2 M H`
per matrix: three for gated activations, two otherwise) or, in a sparse layer, the router (`2 M E`;
none for hash routing, twice for noisy top-k's noise kernel) plus k experts of width `moe.d_ff` and
`moe.activation`, the shared experts and ST-MoE's extra dense FFN; the logits `2 M V` per target
token. The encoder-decoder's cross-attention projects queries and outputs per decoder token and keys
and values per encoder token, in every decoder layer. A training step is 3 x forward (the backward
pass is twice the forward; rematerialisation is not counted, as model FLOPs utilisation does not
count it). This is PaLM's `6 N + 12 L H Q T` per token with N the active matmul parameters
(Chowdhery et al. 2022, App. B). Capacity padding, dispatch and combine einsums and the FLOPs of
norms and softmaxes are not in it, so a compiled step's FLOPs exceed it.
"""

from moe_jax import experts
from moe_jax.config import DECODER_KINDS
from moe_jax.stack import sparse_layer_flags


def _ffn(d_model: int, d_ff: int, activation: str) -> int:
    """Forward FLOPs per token of one FFN."""
    return 2 * d_model * d_ff * (3 if experts.is_gated(activation) else 2)


def _self_attention(model, keys: int) -> int:
    """Forward FLOPs per token of one self-attention attending to `keys` positions."""
    heads = model.num_heads
    if model.kind == "rope_decoder" and model.attention == "mla":
        query_width = heads * (model.qk_nope_head_dim + model.qk_rope_head_dim)
        if model.q_lora_rank:
            queries = model.q_lora_rank * (model.d_model + query_width)
        else:
            queries = model.d_model * query_width
        latent = model.d_model * (model.kv_lora_rank + model.qk_rope_head_dim)
        up = model.kv_lora_rank * heads * (model.qk_nope_head_dim + model.v_head_dim)
        out = heads * model.v_head_dim * model.d_model
        context = keys * (query_width + heads * model.v_head_dim)
        return 2 * (queries + latent + up + out + context)
    kv_heads = model.num_kv_heads or heads
    width, kv_width = heads * model.head_dim, kv_heads * model.head_dim
    return 2 * model.d_model * (2 * width + 2 * kv_width) + 2 * 2 * keys * width


def _layer(config, sparse: bool, keys: int) -> int:
    """Forward FLOPs per token of one self-attention layer attending to `keys` positions."""
    model, moe = config.model, config.moe
    flops = _self_attention(model, keys)
    if not sparse:
        return flops + _ffn(model.d_model, model.d_ff, model.ffn_activation)
    activation = moe.activation or model.ffn_activation
    d_ff = moe.d_ff or model.d_ff
    routers = {"hash": 0, "noisy_top_k": 2}.get(moe.router, 1)
    flops += routers * 2 * model.d_model * moe.num_experts
    flops += moe.k * _ffn(model.d_model, d_ff, activation)
    flops += _ffn(model.d_model, moe.num_shared_experts * d_ff, activation)
    if moe.extra_dense_ffn:
        flops += _ffn(model.d_model, model.d_ff, model.ffn_activation)
    return flops


def forward_flops(config, *, batch_size: int, length: int, encoder_length: int = 0) -> float:
    """Forward FLOPs of a batch of `batch_size` rows of `length` tokens (the decoder's; for an
    encoder-decoder also `encoder_length` encoder tokens per row), summed over the batch."""
    model = config.model
    width = model.num_heads * model.head_dim
    logits = 2 * model.d_model * model.vocab_size
    if model.kind in DECODER_KINDS:
        flags = sparse_layer_flags(model.num_layers, config.moe)
        per_token = sum(_layer(config, sparse, length) for sparse in flags) + logits
        return float(batch_size * length * per_token)
    encoder = sum(
        _layer(config, sparse, encoder_length)
        for sparse in sparse_layer_flags(model.num_encoder_layers, config.moe)
    )
    decoder_flags = sparse_layer_flags(model.num_decoder_layers, config.moe)
    decoder = sum(_layer(config, sparse, length) for sparse in decoder_flags) + logits
    cross_per_decoder_token = 2 * model.d_model * 2 * width + 2 * 2 * encoder_length * width
    cross_per_encoder_token = 2 * model.d_model * 2 * width
    decoder += len(decoder_flags) * cross_per_decoder_token
    encoder += len(decoder_flags) * cross_per_encoder_token
    return float(batch_size * (encoder_length * encoder + length * decoder))


def train_flops(config, *, batch_size: int, length: int, encoder_length: int = 0) -> float:
    """Model FLOPs of one training step (3 x `forward_flops`)."""
    return 3 * forward_flops(
        config, batch_size=batch_size, length=length, encoder_length=encoder_length
    )

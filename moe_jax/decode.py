"""Incremental decoding with a key/value cache: greedy, temperature, top-k and top-p sampling.

    tokens = moe_jax.decode.generate(model, prompts, max_new_tokens=32)        # greedy
    tokens = generate(model, prompts, max_new_tokens=32, temperature=0.8, top_p=0.9,
                      rng=jax.random.key(0), eos_id=1, prompt_lengths=lengths)

For a decoder-only model (`models.DecoderLM`) `prompts: i32[B, P]` are the sequences to
continue (row b is `prompts[b, :prompt_lengths[b]]`); for an encoder-decoder
(`models.EncoderDecoder`) they are the encoder inputs and decoding starts from the decoder start
token 0. The result is `i32[B, max_new_tokens]`: row b's new tokens; after a row's `eos_id` the
row holds 0.

How it runs. One jit-compiled program per (model structure, shapes, settings): it runs the
encoder once (encoder-decoder), fills the caches with the first `min(prompt_lengths)` tokens in
one call (prefill), then a `jax.lax.while_loop` whose body, the step, feeds one token per row:
a row still inside its prompt is fed its next prompt token, the others their last sampled one.
Every cached key sits at its true position, so relative position biases are those of the full
forward pass. The loop ends when every row has its `max_new_tokens` tokens or its EOS.

Routing at decode time (the rule). A decode step routes B tokens, one per row, so a capacity
derived from a capacity factor is meaningless there: the decoder never drops. Every MoE layer
of the decoder stack runs with `capacity=None` (`MoeFeedForward.dropless`), so each token
reaches all of its chosen experts and its routing depends on that token alone, exactly as in a
dropless teacher-forced pass. An encoder-decoder's encoder reads the whole prompt in one call,
as in evaluation, and keeps its eval capacity (`moe.expert_capacity` or the eval capacity
factor): the encoder output that decoding attends to is that of the eval forward pass (and of
`transformers`, whose Switch drops by the same capacity). Evaluation policies apply: no router
jitter or noise, GShard top-2 keeps every second choice (second_policy 'all'), the aux-free bias
stays fixed. Expert Choice lets experts pick among future tokens and cannot decode; a decoder
stack that uses it is refused. Teacher-forced scoring (`moe_jax.score`) keeps the eval capacity
factor unless asked to run dropless.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.attention import AttentionCache
from moe_jax.layers import MoeFeedForward, inference_copy
from moe_jax.models import DecoderLM, EncoderDecoder

# Python-side count of how often the decode step has been traced (compiled); tests read it.
STEP_TRACES = 0


class Sampling(NamedTuple):
    """How the next token is chosen from f32[B, V] logits. A pytree of scalars: changing the
    settings does not recompile."""

    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens (None: all)
    top_p: float | None = None  # keep the smallest set whose probability reaches top_p (None: all)


def check_sampling(sampling: Sampling, vocab_size: int, rng: jax.Array | None) -> None:
    """ValueError naming the bad setting and the fix."""
    if not sampling.temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {sampling.temperature!r}.")
    if sampling.top_k is not None and not 1 <= sampling.top_k <= vocab_size:
        raise ValueError(
            f"top_k must be in [1, vocab_size={vocab_size}] or None, got {sampling.top_k!r}."
        )
    if sampling.top_p is not None and not 0 < sampling.top_p <= 1:
        raise ValueError(
            f"top_p must be in (0, 1] (1 keeps every token), or None, got {sampling.top_p!r}."
        )
    if sampling.temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(seed).")


def _as_arrays(sampling: Sampling, vocab_size: int) -> Sampling:
    """The settings as f32/i32 scalars; None becomes the value that keeps every token."""
    return Sampling(
        jnp.float32(sampling.temperature),
        jnp.int32(vocab_size if sampling.top_k is None else sampling.top_k),
        jnp.float32(2.0 if sampling.top_p is None else sampling.top_p),
    )


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """`logits: f32[B, V]` -> i32[B] next tokens (argmax when `sampling.temperature == 0`).

    Sampling divides the logits by the temperature, keeps the `top_k` largest (ties at the
    k-th value are kept), then the most likely tokens whose probabilities, summed in decreasing
    order, first reach `top_p` (the most likely token is always kept), and draws from the rest.
    The settings may be traced scalars (see `Sampling`); None keeps every token.
    """
    if any(value is None for value in sampling):
        sampling = _as_arrays(sampling, logits.shape[-1])
    temperature, top_k, top_p = sampling
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    logits = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V], decreasing
    kth = jnp.take(sorted_logits, top_k - 1, axis=1)[:, None]  # [B, 1]
    sorted_logits = jnp.where(sorted_logits >= kth, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
    kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)  # [B, 1] smallest kept logit
    logits = jnp.where(logits >= jnp.maximum(threshold, kth), logits, -jnp.inf)
    sampled = jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def _forward(model, encoder_inputs: jax.Array | None):
    """`forward(tokens: i32[B, L], cache_index, first: bool) -> f32[B, L, V]` through the cache.
    The first call of an encoder-decoder runs the encoder and fills the cross-attention caches."""
    if isinstance(model, DecoderLM):
        return lambda tokens, index, first: model(tokens, deterministic=True, cache_index=index)[0]
    encoder_valid = encoder_inputs != 0

    def forward(tokens, index, first):
        encoded = model.encode(encoder_inputs, deterministic=True)[0] if first else None
        return model.decode(tokens, encoded, encoder_valid, deterministic=True, cache_index=index)[
            0
        ]

    return forward


@functools.partial(
    jax.jit, static_argnames=("graphdef", "prefill", "max_new_tokens", "with_logits")
)
def _decode_program(
    graphdef: nnx.GraphDef,
    cache: nnx.State,
    rest: nnx.State,
    tokens: jax.Array,
    starts: jax.Array,
    encoder_inputs: jax.Array | None,
    rng: jax.Array,
    eos_id: jax.Array,
    *,
    prefill: int,
    max_new_tokens: int,
    sampling: Sampling,
    with_logits: bool,
):
    """`tokens: i32[B, Lc]` (prompts, then zeros), `starts: i32[B]` first generated position of
    each row -> (i32[B, max_new_tokens], f32[B, max_new_tokens, V] logits or None)."""
    batch, length = tokens.shape
    model = nnx.merge(graphdef, cache, rest)
    logits = _forward(model, encoder_inputs)(tokens[:, :prefill], 0, True)[:, -1]  # [B, V]
    cache = nnx.state(model, AttentionCache)
    stop = starts + max_new_tokens  # [B] first position past each row's new tokens
    all_logits = jnp.zeros((batch, length, logits.shape[-1]) if with_logits else (0,))

    def step(carry):
        global STEP_TRACES
        STEP_TRACES += 1
        cache, rest, logits, t, tokens, done, all_logits = carry
        sampled = sample_logits(logits, jax.random.fold_in(rng, t), sampling)  # [B]
        forced = t < starts  # still inside the prompt
        token = jnp.where(forced, tokens[:, t], jnp.where(done, 0, sampled))
        tokens = tokens.at[:, t].set(token)
        if with_logits:
            all_logits = all_logits.at[:, t].set(logits)
        done = done | (~forced & (token == eos_id))
        model = nnx.merge(graphdef, cache, rest)
        logits = _forward(model, encoder_inputs)(token[:, None], t, False)[:, 0]  # [B, V]
        cache = nnx.state(model, AttentionCache)
        return cache, rest, logits, t + 1, tokens, done, all_logits

    def running(carry):
        t, done = carry[3], carry[5]
        return (t < length) & ~jnp.all(done | (t >= stop))

    done = jnp.zeros((batch,), jnp.bool_)
    # the model's other state rides in the carry too: nnx.scan (scanned layers) inside the loop
    # refuses variables traced outside it
    carry = (cache, rest, logits, jnp.int32(prefill), tokens, done, all_logits)
    _, _, _, _, tokens, _, all_logits = jax.lax.while_loop(running, step, carry)
    index = starts[:, None] + jnp.arange(max_new_tokens)  # [B, max_new_tokens]
    new_tokens = jnp.take_along_axis(tokens, index, axis=1)
    if not with_logits:
        return new_tokens, None
    return new_tokens, jnp.take_along_axis(all_logits, index[..., None], axis=1)


def _check_prompts(
    prompts, prompt_lengths, max_length: int | None
) -> tuple[np.ndarray, np.ndarray]:
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(
            f"prompts must be integer token ids [B, P], got {prompts.dtype}{list(prompts.shape)}."
        )
    batch, width = prompts.shape
    if batch == 0 or width == 0:
        raise ValueError(
            f"prompts {list(prompts.shape)} are empty: give each prompt at least one token "
            "(for a language model, e.g. a beginning-of-sequence token)."
        )
    if prompt_lengths is None:
        lengths = np.full((batch,), width, np.int32)
    else:
        lengths = np.asarray(prompt_lengths, np.int32)
        if lengths.shape != (batch,):
            raise ValueError(f"prompt_lengths must be [B={batch}], got {list(lengths.shape)}.")
    empty = np.flatnonzero(lengths < 1)
    if empty.size:
        raise ValueError(
            f"prompt {int(empty[0])} is empty (prompt_lengths={lengths.tolist()}): give each "
            "prompt at least one token (e.g. a beginning-of-sequence token)."
        )
    if np.any(lengths > width):
        raise ValueError(f"prompt_lengths {lengths.tolist()} exceed the prompts' width {width}.")
    if max_length is not None and lengths.max() > max_length:
        raise ValueError(
            f"a prompt of {int(lengths.max())} tokens is longer than the model's maximum length "
            f"{max_length}: shorten it (e.g. keep its last {max_length} tokens)."
        )
    real = np.arange(width) < lengths[:, None]
    return np.where(real, prompts, 0).astype(np.int32), lengths


def generate(
    model: DecoderLM | EncoderDecoder,
    prompts,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
    prompt_lengths=None,
    max_length: int | None = None,
    return_logits: bool = False,
):
    """Generate `max_new_tokens` tokens per prompt with a key/value cache (module docstring).

    Args:
      model: a `DecoderLM` or `EncoderDecoder` (not modified; a copy whose decoder routes
        dropless decodes, the encoder keeping its eval capacity).
      prompts: i32[B, P] prompts padded on the right (encoder inputs for an encoder-decoder).
      prompt_lengths: i32[B] real length of each prompt (default P for every row).
      temperature, top_k, top_p: `Sampling`; temperature 0 is greedy.
      rng: a `jax.random.key`, needed when sampling; the same key gives the same tokens.
      eos_id: a row stops after emitting it; its later tokens are 0.
      max_length: the model's maximum length (e.g. the training length); a decoder-only model
        refuses a prompt plus new tokens past it, an encoder-decoder a longer prompt.
      return_logits: also return the f32[B, max_new_tokens, V] logits each token was chosen from.

    Returns:
      i32[B, max_new_tokens] (and the logits when `return_logits`).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    sampling = Sampling(float(temperature), top_k, None if top_p is None else float(top_p))
    vocab_size = model.embed.embedding.shape[0]
    check_sampling(sampling, vocab_size, rng)
    is_decoder = isinstance(model, DecoderLM)
    if not is_decoder and not isinstance(model, EncoderDecoder):
        raise ValueError(f"generate needs a DecoderLM or EncoderDecoder, got {type(model)}.")
    for _, module in nnx.iter_modules(model.decoder):
        if isinstance(module, MoeFeedForward) and module.router_kind == "experts_choose":
            raise ValueError(
                "Expert Choice (router 'experts_choose') in a decoder sees future tokens and "
                "cannot decode one token at a time; use a tokens-choose decoder router."
            )
    prompts, lengths = _check_prompts(prompts, prompt_lengths, max_length)
    batch, width = prompts.shape
    if is_decoder:
        if max_length is not None and lengths.max() + max_new_tokens > max_length:
            raise ValueError(
                f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) "
                f"exceed the model's maximum length {max_length}: lower max_new_tokens to "
                f"{max_length - int(lengths.max())} or shorten the prompt."
            )
        tokens = np.zeros((batch, width + max_new_tokens), np.int32)
        tokens[:, :width] = prompts
        starts, prefill, encoder_inputs = lengths, int(lengths.min()), None
    else:
        tokens = np.zeros((batch, 1 + max_new_tokens), np.int32)  # position 0: start token 0
        starts, prefill, encoder_inputs = np.ones((batch,), np.int32), 1, jnp.asarray(prompts)
    copy = inference_copy(model, dropless=True, encoder_dropless=False)
    if is_decoder:
        copy.init_cache(batch, tokens.shape[1])
    else:
        copy.init_cache(batch, tokens.shape[1], width)
    graphdef, cache, rest = nnx.split(copy, AttentionCache, ...)
    new_tokens, logits = _decode_program(
        graphdef,
        cache,
        rest,
        jnp.asarray(tokens),
        jnp.asarray(starts),
        encoder_inputs,
        jax.random.key(0) if rng is None else rng,
        jnp.int32(-1 if eos_id is None else eos_id),
        prefill=prefill,
        max_new_tokens=max_new_tokens,
        sampling=_as_arrays(sampling, vocab_size),
        with_logits=return_logits,
    )
    return (new_tokens, logits) if return_logits else new_tokens

"""Token-array transforms for training rows: packing, T5 span corruption, model features.

Pure NumPy on host arrays; no JAX, no Flax, no knowledge of any data source. `moe_jax.data`
binds them to its token layout (pad 0, eos 1, sentinels at the top of the vocabulary).
As in T5X, the pad id doubles as the decoder's start token.

Span corruption follows T5 (Raffel et al. 2020, §3.1.4 and §3.3.4: 15% of the tokens, mean
span length 3): the noise tokens form `num_noise_spans` runs; the encoder sees the text with each
run replaced by one sentinel, the decoder predicts each sentinel followed by the run it hides.
Sentinel i (the i-th run, from 0) is `vocab_size - 1 - i`, counting down from the top of the
vocabulary as T5's `<extra_id_i>` tokens do.
"""

import math

import numpy as np


def pack_sequences(sequences, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Concatenates `sequences` in order and cuts the stream into rows of `length` tokens.

    No token is dropped or reordered: a sequence that crosses a row boundary continues, as a new
    segment, at the start of the next row; only the last row is padded.

    Args:
      sequences: iterable of 1-D integer arrays (empty ones are skipped).
      length: tokens per row.
      pad_id: token that fills the tail of the last row.

    Returns:
      `tokens` i32[R, length]; `segment_ids` i32[R, length], numbering the pieces in each row
      1, 2, ... (0 on padding); `positions` i32[R, length], the index of each token within its
      piece (0 on padding). R = ceil(total tokens / length), at least 1.
    """
    if length < 1:
        raise ValueError(f"pack_sequences needs length >= 1, got {length}.")
    pieces = [np.asarray(s, dtype=np.int32).reshape(-1) for s in sequences]
    pieces = [p for p in pieces if p.size]
    lengths = np.array([p.size for p in pieces], dtype=np.int64)
    total = int(lengths.sum())
    num_rows = max(1, math.ceil(total / length))
    tokens = np.full(num_rows * length, pad_id, dtype=np.int32)
    if pieces:
        tokens[:total] = np.concatenate(pieces)
    sequence_index = np.full(num_rows * length, -1, dtype=np.int64)
    sequence_index[:total] = np.repeat(np.arange(len(pieces)), lengths)
    flat_index = np.arange(num_rows * length)
    is_real = sequence_index >= 0
    # A piece starts at a row's first token or where the sequence index changes.
    starts = is_real & ((flat_index % length == 0) | (sequence_index != np.roll(sequence_index, 1)))
    starts = starts.reshape(num_rows, length)  # [R, L]
    segment_ids = np.cumsum(starts, axis=1) * is_real.reshape(num_rows, length)
    column = np.broadcast_to(np.arange(length), (num_rows, length))
    last_start = np.maximum.accumulate(np.where(starts, column, 0), axis=1)
    positions = (column - last_start) * (segment_ids > 0)
    return {
        "tokens": tokens.reshape(num_rows, length),
        "segment_ids": segment_ids.astype(np.int32),
        "positions": positions.astype(np.int32),
    }


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def noise_span_counts(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) for a row of `length` raw tokens.

    num_noise_tokens = round(length * noise_density), kept in [1, length - 1];
    num_noise_spans = round(num_noise_tokens / mean_noise_span_length), kept in
    [1, min(num_noise_tokens, length - num_noise_tokens)] so every run is non-empty.
    """
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got length={length}.")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}.")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}.")
    num_noise = min(max(_round_half_up(length * noise_density), 1), length - 1)
    num_spans = _round_half_up(num_noise / mean_noise_span_length)
    num_spans = min(max(num_spans, 1), num_noise, length - num_noise)
    return num_noise, num_spans


def span_corruption_lengths(
    inputs_length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """(tokens_length, targets_length) for encoder rows of `inputs_length` tokens.

    tokens_length is the longest raw chunk whose corrupted inputs (kept tokens, one sentinel per
    run, one eos) still fit in `inputs_length`; targets_length is the length of its targets (one
    sentinel per run, the noise tokens, one eos). T5X pretrains T5 1.1 with inputs 512 and
    targets 114 (t5_1_1 small_c4_pretrain.gin); this returns (568, 114) for (512, 0.15, 3.0).
    """
    if inputs_length < 3:
        raise ValueError(f"span corruption needs inputs_length >= 3, got {inputs_length}.")

    def corrupted_lengths(tokens_length: int) -> tuple[int, int]:
        num_noise, num_spans = noise_span_counts(
            tokens_length, noise_density, mean_noise_span_length
        )
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    # inputs_length - 1 raw tokens always fit: each run of >= 1 token becomes one sentinel.
    tokens_length = max(2, inputs_length - 1)
    while corrupted_lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, corrupted_lengths(tokens_length)[1]


def _random_partition(total: int, num_parts: int, rng: np.random.Generator) -> np.ndarray:
    """i64[num_parts] positive parts summing to `total`, uniform over all such compositions."""
    cuts = np.sort(rng.choice(total - 1, size=num_parts - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [total]]))


def random_spans_noise_mask(
    length: int,
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> np.ndarray:
    """bool[length]: True on noise tokens.

    The counts come from `noise_span_counts`; the noise and the kept tokens are each split into
    num_noise_spans runs of random positive lengths, interleaved kept-first, so the row starts
    with a kept run and ends with a noise run.
    """
    num_noise, num_spans = noise_span_counts(length, noise_density, mean_noise_span_length)
    noise_runs = _random_partition(num_noise, num_spans, rng)
    kept_runs = _random_partition(length - num_noise, num_spans, rng)
    run_lengths = np.stack([kept_runs, noise_runs], axis=1).reshape(-1)  # [2 * spans]
    run_is_noise = np.tile([False, True], num_spans)
    return np.repeat(run_is_noise, run_lengths)


def _replace_runs_with_sentinels(
    tokens: np.ndarray, mask: np.ndarray, vocab_size: int
) -> np.ndarray:
    """Drops the masked tokens, putting sentinel i where the i-th masked run began."""
    run_start = mask & ~np.concatenate([[False], mask[:-1]])
    sentinels = vocab_size - 1 - (np.cumsum(run_start) - 1)
    return np.where(run_start, sentinels, tokens)[~mask | run_start]


def span_corruption(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    eos_id: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of one row.

    Args:
      tokens: i32[N] raw tokens, N >= 2, all below the sentinels used.
      rng: NumPy generator that draws the noise mask.
      vocab_size: sentinel i is `vocab_size - 1 - i`.
      eos_id: appended to both outputs.

    Returns:
      (inputs i32[N - noise + spans + 1], targets i32[noise + spans + 1]): e.g. tokens
      `a b c d e` with noise on `b c` and `e` give inputs `a S0 d S1 eos` and targets
      `S0 b c S1 e eos`, where Si = vocab_size - 1 - i.
    """
    tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    mask = random_spans_noise_mask(tokens.size, rng, noise_density, mean_noise_span_length)
    num_spans = int(np.sum(mask & ~np.concatenate([[False], mask[:-1]])))
    lowest_sentinel = vocab_size - num_spans
    if tokens.max(initial=0) >= lowest_sentinel:
        raise ValueError(
            f"span corruption of {tokens.size} tokens uses sentinels {lowest_sentinel}.."
            f"{vocab_size - 1}, which collide with token id {int(tokens.max())}; "
            "raise vocab_size or shorten the rows."
        )
    eos = np.array([eos_id], dtype=np.int32)
    inputs = np.concatenate([_replace_runs_with_sentinels(tokens, mask, vocab_size), eos])
    # The kept runs of the targets are the noise runs of the inputs: one sentinel each.
    targets = np.concatenate([_replace_runs_with_sentinels(tokens, ~mask, vocab_size), eos])
    return inputs.astype(np.int32), targets.astype(np.int32)


def shift_right_in_segments(tokens: np.ndarray, positions: np.ndarray, pad_id: int = 0):
    """i32[L]: each token's predecessor in its segment; `pad_id` (the start token) at position 0."""
    previous = np.concatenate([[pad_id], tokens[:-1]])
    return np.where(positions > 0, previous, pad_id).astype(np.int32)


def lm_features(
    tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Decoder-only features of one packed row (i32[L] each; segment id 0 marks padding).

    Returns `inputs` (targets shifted right inside each segment), `targets`, `weights` f32[L]
    (1 on real tokens), `segment_ids` and `positions`.
    """
    return {
        "inputs": shift_right_in_segments(tokens, positions, pad_id),
        "targets": np.asarray(tokens, np.int32),
        "weights": (segment_ids > 0).astype(np.float32),
        "segment_ids": np.asarray(segment_ids, np.int32),
        "positions": np.asarray(positions, np.int32),
    }


def _pad_to(ids: np.ndarray, length: int, pad_id: int):
    """(ids, segment_ids, positions), each i32[length]: one segment, then `pad_id`."""
    tokens = np.full(length, pad_id, np.int32)
    tokens[: ids.size] = ids
    segment_ids = (np.arange(length) < ids.size).astype(np.int32)
    return tokens, segment_ids, np.arange(length, dtype=np.int32) * segment_ids


def span_corruption_features(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    inputs_length: int,
    targets_length: int,
    vocab_size: int,
    eos_id: int,
    pad_id: int = 0,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> dict[str, np.ndarray]:
    """Encoder-decoder features of one raw row `tokens` i32[N], span-corrupted and padded.

    Returns encoder_inputs, encoder_segment_ids, encoder_positions i32[inputs_length] and
    decoder_inputs (targets shifted right), decoder_targets, decoder_segment_ids,
    decoder_positions i32[targets_length], decoder_weights f32[targets_length]; real tokens
    have segment id 1, padding 0. `span_corruption_lengths` gives lengths that fit.
    """
    inputs, targets = span_corruption(
        tokens,
        rng,
        vocab_size=vocab_size,
        eos_id=eos_id,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
    )
    if inputs.size > inputs_length or targets.size > targets_length:
        raise ValueError(
            f"{tokens.size} raw tokens corrupt to {inputs.size} inputs and {targets.size} "
            f"targets, more than {inputs_length} and {targets_length}; size the raw row with "
            "span_corruption_lengths."
        )
    encoder_inputs, encoder_segment_ids, encoder_positions = _pad_to(inputs, inputs_length, pad_id)
    decoder_targets, decoder_segment_ids, decoder_positions = _pad_to(
        targets, targets_length, pad_id
    )
    return {
        "encoder_inputs": encoder_inputs,
        "encoder_segment_ids": encoder_segment_ids,
        "encoder_positions": encoder_positions,
        "decoder_inputs": shift_right_in_segments(decoder_targets, decoder_positions, pad_id),
        "decoder_targets": decoder_targets,
        "decoder_weights": decoder_segment_ids.astype(np.float32),
        "decoder_segment_ids": decoder_segment_ids,
        "decoder_positions": decoder_positions,
    }

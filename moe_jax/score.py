"""Teacher-forced scoring with routing traces: `python -m moe_jax.score`.

    python -m moe_jax.score --workdir=runs/switch_tiny --text=notes.txt --out=trace.jsonl

The text file is read as bytes (the byte-level tokenizer of `moe_jax.data`) and cut into rows of
`train.seq_len` tokens. A decoder-only model reads each row shifted right (start token 0) and
predicts it; an encoder-decoder reads the row in its encoder and predicts the same row from its
decoder (a reconstruction loss, used here for the encoder's routing). Routing keeps the eval
capacity factor, so tokens may be dropped as in evaluation; `--dropless` routes with no capacity
limit (see `moe_jax.decode` for the decode-time rule).

`trace.jsonl` has one JSON object per scored token:
`{"row", "position", "target", "loss", "routing": [{"stack", "layer", "token", "experts",
"weights"}, ...]}`: the token's cross-entropy (nats), and for each MoE layer (bottom to top,
encoder first) the token that layer routed at this position (the decoder input is the previous
token), the experts that processed it and their combine weights (an empty list: dropped).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from moe_jax import cli, data, decode, train
from moe_jax.config import DECODER_KINDS
from moe_jax.metrics import weighted_means
from moe_jax.models import DecoderLM
from moe_jax.stack import sparse_layer_flags
from moe_jax.steps import compute_loss


def score(model, tokens: jax.Array, *, dropless: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per-token losses and routing of the rows `tokens: i32[B, L]`.

    Returns `(loss f32[B, L], token_weights f32[S, B, L, E])` (S sparse layers, encoder first;
    `token_weights` is `[0, B, L, 0]` for a dense model). Targets are the rows; a decoder reads
    them shifted right with start token 0.
    """
    traced = decode.inference_copy(model, dropless=dropless, trace_routing=True)
    graphdef, state = nnx.split(traced)
    return _score(graphdef, state, jnp.asarray(tokens, jnp.int32))


@jax.jit
def _score(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    shifted = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))  # [B, L] start token 0
    if isinstance(model, DecoderLM):
        logits, aux = model(shifted, deterministic=True)
    else:
        logits, aux = model(tokens, shifted, deterministic=True)
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, L, V]
    loss = -jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]  # [B, L]
    if aux is None:
        return loss, jnp.zeros((0, *tokens.shape, 0), jnp.float32)
    return loss, aux.token_weights


def eval_cross_entropy(model, config, num_batches: int) -> float:
    """Token-weighted mean cross-entropy (nats) of `model` over the first `num_batches`
    validation batches of `config`'s data, deterministic (the eval capacity factor)."""
    dataset = data.dataset_from_config(config, "validation")
    graphdef, state = nnx.split(model)

    @jax.jit
    def metrics(state, batch):
        _, values = compute_loss(nnx.merge(graphdef, state), batch, config, deterministic=True)
        return values

    results = [jax.device_get(metrics(state, dataset.batch(index))) for index in range(num_batches)]
    return float(weighted_means(results)["cross_entropy"])


def sparse_layers(config) -> list[tuple[str, int]]:
    """`(stack, layer index)` of each sparse layer, in `MoeAux` order (encoder first)."""
    model = config.model
    if model.kind in DECODER_KINDS:
        stacks = [("decoder", model.num_layers)]
    else:
        stacks = [("encoder", model.num_encoder_layers), ("decoder", model.num_decoder_layers)]
    return [
        (stack, index)
        for stack, num_layers in stacks
        for index, sparse in enumerate(sparse_layer_flags(num_layers, config.moe))
        if sparse
    ]


def trace_records(
    config, tokens: np.ndarray, loss: np.ndarray, token_weights: np.ndarray
) -> Iterator[dict]:
    """The JSON objects of `trace.jsonl` (module docstring), row by row."""
    shifted = np.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    layers = sparse_layers(config)
    for row in range(tokens.shape[0]):
        for position in range(tokens.shape[1]):
            routing = []
            for (stack, layer), weights in zip(layers, token_weights, strict=True):
                routed = tokens if stack == "encoder" else shifted
                token_row = weights[row, position]  # [E]
                experts = np.flatnonzero(token_row > 0)
                experts = experts[np.argsort(-token_row[experts])]  # heaviest first
                routing.append(
                    {
                        "stack": stack,
                        "layer": layer,
                        "token": int(routed[row, position]),
                        "experts": experts.tolist(),
                        "weights": [round(float(token_row[e]), 6) for e in experts],
                    }
                )
            yield {
                "row": row,
                "position": position,
                "target": int(tokens[row, position]),
                "loss": round(float(loss[row, position]), 6),
                "routing": routing,
            }


def text_rows(path: str, length: int) -> np.ndarray:
    """i32[B, length]: the byte ids of the file at `path`, the last row padded with 0."""
    with open(path, "rb") as file:
        ids = data.ByteTokenizer().encode(file.read())
    if ids.size == 0:
        raise ValueError(f"--text={path} is empty: give a file with some text to score.")
    rows = -(-ids.size // length)
    padded = np.zeros((rows * length,), np.int32)
    padded[: ids.size] = ids
    return padded.reshape(rows, length)  # [B, L]


def main(argv: list[str]) -> int:
    options = cli.flag_values(argv)
    try:
        config, model, step = train.restore_for_inference(options.workdir)
        tokens = text_rows(options.text, options.length or config.train.seq_len)
    except (FileNotFoundError, ValueError) as error:
        sys.stderr.write(f"moe_jax.score: {error}\n")
        return 1
    loss, token_weights = score(model, tokens, dropless=options.dropless)
    loss, token_weights = np.asarray(loss), np.asarray(token_weights)
    real = tokens > 0
    with open(options.out, "w", encoding="utf-8") as file:
        for record in trace_records(config, tokens, loss, token_weights):
            if real[record["row"], record["position"]]:
                file.write(json.dumps(record) + "\n")
    mean = float(loss[real].mean())
    print(
        f"scored {int(real.sum())} tokens with the checkpoint of step {step}: mean loss "
        f"{mean:.4f} nats ({mean / np.log(2):.4f} bits) per byte\n  trace: {options.out}",
        file=sys.stderr,
    )
    return 0


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir whose latest checkpoint scores.")
    flags.DEFINE_string("text", None, "Text file to score (read as bytes).")
    flags.DEFINE_string("out", "trace.jsonl", "Where the per-token JSON-lines trace goes.")
    flags.DEFINE_integer("length", 0, "Tokens per row; 0 means the run's train.seq_len.")
    flags.DEFINE_bool("dropless", False, "Route with no capacity limit (no token dropped).")
    flags.mark_flags_as_required(["workdir", "text"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)

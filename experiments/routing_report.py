"""What the experts learned, from a routing trace of `python -m moe_jax.score`.

    python -m experiments.routing_report --trace=trace.jsonl --figure=experiments/figures/x.png

Prints a markdown report and writes one figure:
(a) a token x layer picture: the first `--tokens` tokens of the trace along x, the MoE layers
    along y, each cell coloured by the expert with the largest weight (white: dropped);
(b) per layer and expert, the tokens it receives most often and the share of its load they
    make (load: every token-expert assignment counts once);
(c) per layer, how much of the routing the token id alone explains: the accuracy of predicting
    a token's top expert from its id (OpenMoE's "context-independent specialisation", Xue et
    al. 2024, Sec. 5). The predictor is the majority expert of each id, fitted on the first half
    of the trace and scored on the second (ids unseen in the first half get the overall
    majority expert); the in-sample accuracy and the majority-expert baseline are printed
    beside it. 1.0 means the id decides the expert; the baseline is what ignoring the id gives.

Token ids of the byte-level tokenizer (ids 3..258 are bytes) print as their characters.
"""

from __future__ import annotations

import argparse
import collections
import json
from collections.abc import Sequence

import numpy as np

DROPPED = -1


def layer_name(stack: str, layer: int) -> str:
    """How reports and figures name a sparse layer: 'decoder layer 3' (its index in its stack)."""
    return f"{stack} layer {layer}"


class RoutingTable:
    """A trace as arrays: `tokens i32[N, S]` the token each of the S MoE layers routed at each
    of the N scored positions, `top_expert i32[N, S]` its heaviest expert (-1: dropped),
    `assignments[s]` the (token, expert) pairs of layer s, `layers` the names of the layers."""

    def __init__(self, records: Sequence[dict]):
        if not records or not records[0]["routing"]:
            raise ValueError("the trace has no MoE layers: score a sparse model.")
        self.layers = [layer_name(r["stack"], r["layer"]) for r in records[0]["routing"]]
        self.tokens = np.array([[r["token"] for r in rec["routing"]] for rec in records])
        self.top_expert = np.array(
            [
                [r["experts"][0] if r["experts"] else DROPPED for r in rec["routing"]]
                for rec in records
            ]
        )
        self.assignments = [
            [
                (rec["routing"][s]["token"], e)
                for rec in records
                for e in rec["routing"][s]["experts"]
            ]
            for s in range(len(self.layers))
        ]
        self.loss = np.array([rec["loss"] for rec in records])


def load_trace(path: str) -> RoutingTable:
    with open(path, encoding="utf-8") as file:
        return RoutingTable([json.loads(line) for line in file if line.strip()])


def token_label(token: int) -> str:
    """A byte token (3..258) as its character, escaped when not printable; others as `#id`."""
    if 3 <= token < 259:
        char = chr(token - 3)
        return repr(char)[1:-1] if char.isprintable() and char != " " else repr(char)
    return f"#{token}"


def markdown_code(text: str) -> str:
    """`text` as a markdown code span that keeps a table row whole: `|` is escaped, and a text
    with a backtick is fenced by two backticks and spaces."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _majority(tokens: np.ndarray, experts: np.ndarray) -> tuple[dict[int, int], int]:
    """Each token id's most frequent expert, and the most frequent expert overall."""
    counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for token, expert in zip(tokens.tolist(), experts.tolist(), strict=True):
        counts[token][expert] += 1
    overall = collections.Counter(experts.tolist()).most_common(1)[0][0]
    return {token: c.most_common(1)[0][0] for token, c in counts.items()}, overall


def token_id_accuracy(tokens: np.ndarray, experts: np.ndarray) -> dict[str, float]:
    """How well the token id predicts the top expert (module docstring, (c)); routed tokens only.

    Returns `held_out` (fit on the first half, score on the second), `in_sample` (fit and score
    on all) and `baseline` (the overall majority expert, scored on the second half).
    """
    routed = experts != DROPPED
    tokens, experts = tokens[routed], experts[routed]
    half = len(tokens) // 2
    if half == 0:
        raise ValueError("too few routed tokens in the trace to fit and test a predictor.")
    table, overall = _majority(tokens[:half], experts[:half])
    predicted = np.array([table.get(t, overall) for t in tokens[half:].tolist()])
    full_table, _ = _majority(tokens, experts)
    in_sample = np.array([full_table[t] for t in tokens.tolist()])
    return {
        "held_out": float(np.mean(predicted == experts[half:])),
        "in_sample": float(np.mean(in_sample == experts)),
        "baseline": float(np.mean(experts[half:] == overall)),
    }


def expert_top_tokens(
    assignments: list[tuple[int, int]], *, top: int = 5
) -> dict[int, tuple[int, list[tuple[int, float]]]]:
    """Per expert: (its load, its `top` most frequent tokens with their share of that load)."""
    per_expert: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for token, expert in assignments:
        per_expert[expert][token] += 1
    result = {}
    for expert in sorted(per_expert):
        counts = per_expert[expert]
        load = sum(counts.values())
        result[expert] = (load, [(t, n / load) for t, n in counts.most_common(top)])
    return result


def plot_token_layer_grid(table: RoutingTable, path: str | None, *, num_tokens: int = 64):
    """(a): the figure of the first `num_tokens` positions; saved to `path` when given."""
    import matplotlib

    if path:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    experts = table.top_expert[:num_tokens].T  # [S, n]
    num_experts = max(int(table.top_expert.max()) + 1, 1)
    colours = plt.get_cmap("tab10" if num_experts <= 10 else "tab20", num_experts)
    picture = np.ones((*experts.shape, 4))  # white where dropped
    routed = experts != DROPPED
    picture[routed] = colours(experts[routed])
    fig, axis = plt.subplots(
        figsize=(max(6, 0.22 * experts.shape[1]), 0.6 * len(table.layers) + 1.6)
    )
    axis.imshow(picture, aspect="auto", interpolation="nearest")
    labels = [token_label(t) for t in table.tokens[:num_tokens, -1]]
    axis.set_xticks(range(len(labels)), labels, fontsize=7)
    axis.set_yticks(range(len(table.layers)), table.layers, fontsize=8)
    for s in range(experts.shape[0]):
        for i in range(experts.shape[1]):
            if routed[s, i]:
                axis.text(i, s, str(experts[s, i]), ha="center", va="center", fontsize=6)
    axis.set_xlabel("token (the top layer's input; numbers: the expert)")
    legend = [Patch(color=colours(e), label=f"expert {e}") for e in range(num_experts)]
    legend.append(Patch(facecolor="white", edgecolor="grey", label="dropped"))
    axis.legend(
        handles=legend,
        title="top expert",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        title_fontsize=7,
    )
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def report(table: RoutingTable, *, top: int = 5) -> str:
    """The markdown text of (b) and (c)."""
    lines = ["### Tokens per expert (share of the expert's load)", ""]
    for s, name in enumerate(table.layers):
        lines.append(f"{name}:")
        lines.append("")
        lines.append("| expert | load | top tokens (share) |")
        lines.append("|---|---|---|")
        for expert, (load, tokens) in expert_top_tokens(table.assignments[s], top=top).items():
            shown = ", ".join(f"{markdown_code(token_label(t))} {share:.0%}" for t, share in tokens)
            lines.append(f"| {expert} | {load} | {shown} |")
        lines.append("")
    lines += [
        "### Does the token id decide the expert?",
        "",
        "| layer | held-out accuracy | in-sample | majority baseline |",
        "|---|---|---|---|",
    ]
    for s, name in enumerate(table.layers):
        accuracy = token_id_accuracy(table.tokens[:, s], table.top_expert[:, s])
        lines.append(
            f"| {name} | {accuracy['held_out']:.3f} | {accuracy['in_sample']:.3f} | "
            f"{accuracy['baseline']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True, help="trace.jsonl from python -m moe_jax.score")
    parser.add_argument("--figure", default="", help="where the token x layer PNG goes")
    parser.add_argument("--tokens", type=int, default=64, help="positions in the figure")
    parser.add_argument("--top", type=int, default=5, help="tokens listed per expert")
    args = parser.parse_args(argv)
    try:
        table = load_trace(args.trace)
    except FileNotFoundError:
        parser.error(
            f"--trace={args.trace}: no such file; write it first with python -m moe_jax.score "
            f"--workdir=WORKDIR --text=FILE --out={args.trace}"
        )
    except ValueError as error:  # not JSON lines, or no MoE layer in it
        parser.error(f"--trace={args.trace}: {error}")
    if args.figure:
        plot_token_layer_grid(table, args.figure, num_tokens=args.tokens)
    print(f"{len(table.tokens)} tokens, mean loss {table.loss.mean():.4f} nats\n")
    print(report(table, top=args.top))


if __name__ == "__main__":
    main()

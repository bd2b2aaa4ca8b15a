"""Scoring, routing traces, restoring a run for inference, the score/generate CLIs, the report."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_decode import micro_config
from tiny_training import TINY_TRAINING

from experiments import routing_report
from moe_jax import decode, generate, models, routing, score, train
from moe_jax.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hash_run(tmp_path_factory):
    """A 3-step training run of a tiny hash-routed Switch: (workdir, final train state)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = load_config_file(os.path.join(ROOT, "configs", "switch.py") + ":tiny")
    settings = {
        **TINY_TRAINING,
        "train.num_steps": 3,
        "train.eval_every": 0,
        "train.checkpoint_every": 3,
        "moe.router": "hash",
    }
    for key, value in settings.items():
        section, name = key.split(".")
        config[section][name] = value
    return workdir, train.run(config, workdir, devices=jax.devices()[:1]).state


def test_restore_for_inference_gives_the_trained_parameters(hash_run):
    workdir, state = hash_run
    config, model, step = train.restore_for_inference(workdir)
    assert step == 3 and config.moe.router == "hash"
    restored = nnx.state(model, nnx.Param)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(got, want)


def test_restore_for_inference_never_reads_the_optimizer_state(hash_run, monkeypatch):
    # every array orbax deserialises passes through ArrayHandler.deserialize: record their names
    workdir, state = hash_run
    names = []
    deserialize = ocp.type_handlers.ArrayHandler.deserialize

    async def recording_deserialize(self, infos, args=None):
        names.extend(info.name for info in infos)
        return await deserialize(self, infos, args)

    monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "deserialize", recording_deserialize)
    train.restore_for_inference(workdir)
    read = {name.split(".")[0] for name in names}
    assert read <= {"params", "model_state"}, sorted(names)
    assert len(names) == len(jax.tree.leaves((state.params, state.model_state)))


def test_a_workdir_without_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json.*python -m moe_jax.train"):
        train.restore_for_inference(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint.*--workdir="):
        train.restore_for_inference(str(tmp_path))


def test_trace_of_a_hash_router_follows_the_token_ids(hash_run):
    workdir, _ = hash_run
    config, model, _ = train.restore_for_inference(workdir)
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (2, 32), 3, 259))
    loss, weights = score.score(model, tokens)
    # oracle 1: the loss is the cross-entropy of the model's own forward pass
    shifted = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    logits, _ = model(shifted, deterministic=True)
    want = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-5)
    # oracle 2: hash routing sends each (shifted) input token to the expert of its id
    expected = routing.hash_routing(shifted.reshape(1, -1), num_experts=4, capacity=None)
    expected_expert = np.asarray(expected.expert_index).reshape(2, 32)
    records = list(score.trace_records(config, tokens, np.asarray(loss), np.asarray(weights)))
    assert len(records) == 64 and records[5]["target"] == int(tokens[0, 5])
    layer = records[5]["routing"][0]
    assert (layer["stack"], layer["layer"], layer["token"]) == ("decoder", 1, int(shifted[0, 5]))
    for record in records:
        (entry,) = record["routing"]  # one sparse layer of two
        assert entry["experts"] == [expected_expert[record["row"], record["position"]]]
        assert entry["weights"] == [1.0]
    # the report: the token id decides a hash router's expert exactly
    table = routing_report.RoutingTable(records)
    accuracy = routing_report.token_id_accuracy(table.tokens[:, 0], table.top_expert[:, 0])
    assert accuracy["in_sample"] == 1.0
    text = routing_report.report(table)
    assert "| decoder layer 1 |" in text and "held-out accuracy" in text


def test_trace_of_a_rope_decoder_names_its_decoder_layers_and_their_input_tokens():
    """A Llama-style decoder-only model (rope_decoder) is traced as a decoder: each of its
    sparse layers routes the shifted input token (hash routing: the expert of that id)."""
    config = micro_config("rope_decoder", router="hash")
    config.model.num_layers = 4  # sparse layers 1 and 3 (the encoder-decoder depths stay 2, 2)
    model = models.build_model(config, rngs=nnx.Rngs(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 16), 3, 64))
    loss, weights = score.score(model, tokens, dropless=True)  # every token reaches its expert
    shifted = np.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    expected = routing.hash_routing(jnp.asarray(shifted), num_experts=4, capacity=None)
    expected_expert = np.asarray(expected.expert_index)[..., 0]  # [2, 16]
    records = list(score.trace_records(config, tokens, np.asarray(loss), np.asarray(weights)))
    assert len(records) == 32
    for record in records:
        row, position = record["row"], record["position"]
        assert [(entry["stack"], entry["layer"]) for entry in record["routing"]] == [
            ("decoder", 1),
            ("decoder", 3),
        ]
        for entry in record["routing"]:
            assert entry["token"] == int(shifted[row, position])
            assert entry["experts"] == [expected_expert[row, position]]
            assert entry["weights"] == [1.0]


def test_generate_starts_a_rope_decoder_prompt_with_the_start_token(monkeypatch):
    """The byte prompt of any decoder-only run starts with the start token 0, as its training
    rows do; an empty prompt is that token alone and decodes."""
    config = micro_config("rope_decoder")
    model = models.build_model(config, rngs=nnx.Rngs(0))
    monkeypatch.setattr(train, "restore_for_inference", lambda workdir: (config, model, 1))
    _, ids, _, eos_id, max_length = generate._workdir_model("run", "ab", [])
    assert ids == [0, ord("a") + 3, ord("b") + 3] and max_length == config.train.seq_len
    _, ids, _, _, _ = generate._workdir_model("run", "", [])
    assert ids == [0]
    new = decode.generate(model, np.array([ids]), max_new_tokens=2, eos_id=eos_id)
    assert new.shape == (1, 2)


def test_scoring_keeps_the_eval_capacity_unless_dropless():
    config = micro_config()
    config.moe.capacity_factor_eval = 0.25
    model = models.build_model(config, rngs=nnx.Rngs(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (1, 16), 3, 64))
    _, capped = score.score(model, tokens)
    _, dropless = score.score(model, tokens, dropless=True)
    routed = lambda weights: np.asarray((weights > 0).any(-1)).mean()
    assert routed(capped) <= 0.5  # capacity 1 per expert of 4 for 16 tokens
    assert routed(dropless) == 1.0
    # what a dropless trace says equals what the decoder saw while decoding (no drops)
    assert np.allclose(np.asarray(dropless).sum(-1), np.asarray(dropless).max(-1))


def test_token_id_accuracy_literal_case():
    tokens = np.array([5, 5, 6, 6, 5, 5, 6, 7])
    experts = np.array([0, 0, 1, 1, 0, 1, 1, 2])
    # first half {5: 0, 6: 1}, overall majority 0; second half predicted 0, 0, 1, 0 (7 unseen);
    # all: {5: 0 (3 of 4), 6: 1 (3 of 3), 7: 2 (1 of 1)}
    accuracy = routing_report.token_id_accuracy(tokens, experts)
    assert accuracy == {"held_out": 0.5, "in_sample": 7 / 8, "baseline": 0.25}


def literal_trace(tokens: list[int], experts: list[int]) -> routing_report.RoutingTable:
    """A one-layer trace of `tokens` (byte ids) routed to `experts` (-1: dropped)."""
    return routing_report.RoutingTable(
        [
            {
                "loss": 1.0,
                "routing": [
                    {
                        "stack": "decoder",
                        "layer": 1,
                        "token": token,
                        "experts": [] if expert < 0 else [expert],
                    }
                ],
            }
            for token, expert in zip(tokens, experts, strict=True)
        ]
    )


def test_report_tables_keep_their_columns_for_backtick_and_pipe_tokens():
    byte = lambda char: ord(char) + 3  # the byte-level tokenizer's ids are 3 + the byte
    table = literal_trace([byte("`"), byte("|"), byte("`"), byte("a")], [0, 0, 1, 1])
    rows = [line for line in routing_report.report(table).splitlines() if line.startswith("| 0 ")]
    (row,) = rows
    assert row == "| 0 | 2 | `` ` `` 50%, `\\|` 50% |"
    # a markdown table row splits at the pipes no backslash escapes: expert, load, tokens
    assert len(re.split(r"(?<!\\)\|", row.strip("|"))) == 3


def test_routing_figure_has_a_legend_of_the_experts_and_dropped():
    table = literal_trace([40, 41, 42, 43], [0, 2, -1, 1])
    figure = routing_report.plot_token_layer_grid(table, None)
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert labels == ["expert 0", "expert 1", "expert 2", "dropped"]
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == ["decoder layer 1"]


def test_score_and_generate_clis(hash_run, tmp_path):
    workdir, _ = hash_run
    text = tmp_path / "text.txt"
    text.write_text("the experts of a tiny model\n")
    out = tmp_path / "trace.jsonl"
    command = [sys.executable, "-m", "moe_jax.score", f"--workdir={workdir}", f"--text={text}"]
    done = subprocess.run(
        [*command, f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len("the experts of a tiny model\n")
    figure = tmp_path / "grid.png"
    routing_report.main([f"--trace={out}", f"--figure={figure}"])
    assert figure.stat().st_size > 0
    # generate, in process: the byte prompt starts with the start token 0
    model, ids, decode_text, eos_id, max_length = generate._workdir_model(workdir, "ab", [])
    assert ids == [0, ord("a") + 3, ord("b") + 3] and max_length == 32
    new = decode.generate(model, np.array([ids]), max_new_tokens=4, eos_id=eos_id)
    assert new.shape == (1, 4) and isinstance(decode_text(np.asarray(new[0])), str)
    missing = subprocess.run(
        [sys.executable, "-m", "moe_jax.generate", f"--workdir={tmp_path}", "--prompt=x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1 and "python -m moe_jax.train" in missing.stderr

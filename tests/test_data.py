"""Tests of moe_jax.data and moe_jax.spans: sources, token layout, packing, span corruption,
determinism and resume. No test touches the network (see `no_network`)."""

import binascii
import socket
import sys
import sysconfig
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_jax import data, run_identity, spans
from moe_jax.config import default_config

VOCAB = 384


def data_config(name="synthetic", **overrides):
    config = ml_collections.ConfigDict(default_config().data.to_dict())
    config.name = name
    config.update(overrides)
    return config


def dataset(name="synthetic", *, task="lm", split="train", batch_size=4, seq_len=32, seed=0, **kw):
    overrides = {k: kw.pop(k) for k in ("data_dir", "inputs_length", "download") if k in kw}
    return data.make_dataset(
        data_config(name, **overrides),
        split=split,
        batch_size=batch_size,
        seq_len=seq_len,
        vocab_size=kw.pop("vocab_size", VOCAB),
        seed=seed,
        task=task,
        **kw,
    )


LM_SPEC = {"inputs": np.int32, "targets": np.int32, "weights": np.float32}
LM_SPEC.update(segment_ids=np.int32, positions=np.int32)
SPAN_SPEC = {f"encoder_{k}": np.int32 for k in ("inputs", "segment_ids", "positions")}
SPAN_SPEC.update({f"decoder_{k}": np.int32 for k in ("inputs", "targets", "segment_ids")})
SPAN_SPEC.update(decoder_positions=np.int32, decoder_weights=np.float32)


def check_lm_batch(batch, rows, length):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((rows, length), np.dtype(t)) for k, t in LM_SPEC.items()
    }
    targets, positions, segments = batch["targets"], batch["positions"], batch["segment_ids"]
    # inputs: previous token of the same segment; pad (0) where a segment starts.
    previous = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    np.testing.assert_array_equal(batch["inputs"], np.where(positions > 0, previous, 0))
    np.testing.assert_array_equal(batch["weights"], (segments > 0).astype(np.float32))
    assert np.all((targets == data.EOS_ID) | ((targets >= 3) & (targets < 259)) | (segments == 0))
    # positions count up inside a segment and restart at 0 where the segment id changes.
    new_segment = np.diff(segments, axis=1, prepend=-1) != 0
    expected = np.zeros_like(positions)
    for row, col in zip(*np.nonzero(~new_segment)):
        expected[row, col] = expected[row, col - 1] + 1
    np.testing.assert_array_equal(positions, expected * (segments > 0))


def restore_spans(inputs, targets):
    """Original tokens from span-corrupted (inputs, targets) rows: the oracle for inversion."""

    def strip(row):
        row = [int(t) for t in row]
        while row and row[-1] == data.PAD_ID:
            row.pop()
        assert row[-1] == data.EOS_ID
        return row[:-1]

    hidden, current = {}, None
    for token in strip(targets):
        if token >= data.MIN_VOCAB_SIZE:
            current = hidden.setdefault(token, [])
        else:
            current.append(token)
    restored = []
    for token in strip(inputs):
        restored.extend(hidden.pop(token) if token >= data.MIN_VOCAB_SIZE else [token])
    assert not hidden, "every sentinel of the targets appears in the inputs"
    return np.array(restored)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a data test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- tokenizer


def test_byte_tokenizer_layout_and_utf8_round_trip():
    tokenizer = data.ByteTokenizer()
    # 'A' is byte 65 -> id 68; 'é' is bytes C3 A9 (195, 169) -> ids 198, 172; eos is 1.
    np.testing.assert_array_equal(tokenizer.encode("Aé", add_eos=True), [68, 198, 172, 1])
    text = "naïve café — 東京 🚀\n\x00end"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() <= 258
    assert tokenizer.decode(ids) == text
    # pad, eos, unk and sentinels are not text.
    assert tokenizer.decode([0, 68, 1, 2, 383, 69]) == "AB"
    assert data.MIN_VOCAB_SIZE == 259


# ---------------------------------------------------------------- packing


def test_pack_sequences_literal():
    # Stream 1 2 3 | 4 5 | 6 7 8 9 | 10 cut every 4 tokens: [1 2 3 4] [5 6 7 8] [9 10 pad pad].
    # Row 0: piece 1 = 1 2 3, piece 2 = 4;  row 1: 5 (end of [4 5]), then 6 7 8;
    # row 2: 9 (end of [6 7 8 9]), then 10, then padding.
    packed = spans.pack_sequences([[1, 2, 3], [4, 5], [], [6, 7, 8, 9], [10]], 4)
    np.testing.assert_array_equal(packed["tokens"], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]])
    np.testing.assert_array_equal(packed["segment_ids"], [[1, 1, 1, 2], [1, 2, 2, 2], [1, 2, 0, 0]])
    np.testing.assert_array_equal(packed["positions"], [[0, 1, 2, 0], [0, 0, 1, 2], [0, 0, 0, 0]])
    empty = spans.pack_sequences([], 3)
    np.testing.assert_array_equal(empty["tokens"], [[0, 0, 0]])
    np.testing.assert_array_equal(empty["segment_ids"], [[0, 0, 0]])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 50), max_size=12), max_size=10),
    st.integers(1, 9),
)
def test_pack_sequences_loses_no_token(sequences, length):
    packed = spans.pack_sequences(sequences, length)
    tokens, segments, positions = packed["tokens"], packed["segment_ids"], packed["positions"]
    total = sum(len(s) for s in sequences)
    assert tokens.shape == (max(1, -(-total // length)), length)
    # In order, nothing lost: the non-pad tokens are the concatenation.
    np.testing.assert_array_equal(tokens[segments > 0], [t for s in sequences for t in s])
    # Padding only at the end of the last row.
    assert np.count_nonzero(segments == 0) == tokens.size - total
    # Reassemble each sequence from its pieces: a piece that starts a row continues the sequence
    # that ended the previous row exactly when that sequence is not complete yet.
    rebuilt, current, expected = [], [], [s for s in sequences if s]
    for row in range(tokens.shape[0]):
        for segment in range(1, segments[row].max(initial=0) + 1):
            piece = tokens[row][segments[row] == segment]
            np.testing.assert_array_equal(
                positions[row][segments[row] == segment], range(piece.size)
            )
            current.extend(piece.tolist())
            if len(current) == len(expected[len(rebuilt)]):
                rebuilt.append(current)
                current = []
    assert rebuilt == expected


# ---------------------------------------------------------------- span corruption


def test_span_corruption_lengths_match_t5x():
    # T5X pretrains T5 1.1 on c4_v220_span_corruption with inputs 512 and targets 114
    # (t5x/examples/t5/t5_1_1/examples/small_c4_pretrain.gin). Raw 568 tokens: noise
    # round(85.2) = 85, spans round(85 / 3) = 28, inputs 568 - 85 + 28 + 1 = 512,
    # targets 85 + 28 + 1 = 114; 569 raw tokens would need 513 inputs.
    assert spans.span_corruption_lengths(512, 0.15, 3.0) == (568, 114)
    # The default tiny config: 128 encoder tokens.  142 raw: noise round(21.3) = 21,
    # spans 7, inputs 142 - 21 + 7 + 1 = 129 > 128; 141: noise 21, inputs 128, targets 29.
    assert spans.span_corruption_lengths(128, 0.15, 3.0) == (141, 29)


def test_span_corruption_literal():
    # 5 tokens at density 0.4: noise round(2.0) = 2, spans round(2 / 3) = 1, so the single
    # kept run (3 tokens) comes first and the single noise run (2 tokens) last, whatever the rng.
    inputs, targets = spans.span_corruption(
        np.array([10, 11, 12, 13, 14]),
        np.random.default_rng(0),
        vocab_size=20,
        eos_id=1,
        noise_density=0.4,
    )
    np.testing.assert_array_equal(inputs, [10, 11, 12, 19, 1])
    np.testing.assert_array_equal(targets, [19, 13, 14, 1])


@pytest.mark.parametrize("length", [100, 337, 1000, 2048])
def test_noise_mask_density_and_span_length(length):
    rng = np.random.default_rng(length)
    for _ in range(20):
        mask = spans.random_spans_noise_mask(length, rng, 0.15, 3.0)
        starts = np.flatnonzero(np.diff(mask.astype(int), prepend=0) == 1)
        num_noise, num_spans = int(mask.sum()), starts.size
        # Noise fraction is round(0.15 * length) / length: within half a token of the density.
        assert abs(num_noise / length - 0.15) <= 0.5 / length
        # Mean run length num_noise / round(num_noise / 3) is within 3 * 0.5 / spans of 3.
        assert abs(num_noise / num_spans - 3.0) <= 1.5 / num_spans
        assert not mask[0] and mask[-1]  # a kept run first, a noise run last


def test_noise_span_lengths_are_uniform_compositions():
    # 150 noise tokens in 50 runs, uniform over compositions: P(run length = 1) is
    # C(148, 48) / C(149, 49) = 49 / 149 = 0.3289 for every run.
    rng = np.random.default_rng(1)
    run_lengths = []
    for _ in range(200):
        mask = spans.random_spans_noise_mask(1000, rng, 0.15, 3.0)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        run_lengths.extend(edges[1::2] - edges[::2])
    run_lengths = np.array(run_lengths)
    assert run_lengths.size == 200 * 50 and run_lengths.mean() == 3.0
    assert abs(np.mean(run_lengths == 1) - 49 / 149) < 0.02  # 10000 runs: std 0.005


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 400), st.floats(0.05, 0.6), st.floats(1.0, 8.0), st.integers(0, 2**31))
def test_span_corruption_inverts(length, density, mean_span, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 259, size=length)
    inputs, targets = spans.span_corruption(
        tokens,
        rng,
        vocab_size=259 + length // 2,  # room for the at most length // 2 sentinels
        eos_id=1,
        noise_density=density,
        mean_noise_span_length=mean_span,
    )
    num_noise, num_spans = spans.noise_span_counts(length, density, mean_span)
    assert inputs.size == length - num_noise + num_spans + 1
    assert targets.size == num_noise + num_spans + 1
    np.testing.assert_array_equal(restore_spans(inputs, targets), tokens)


def test_span_corruption_rejects_sentinel_collision():
    with pytest.raises(ValueError, match="collide with token id 258"):
        spans.span_corruption(np.full(100, 258), np.random.default_rng(0), vocab_size=260, eos_id=1)


# ---------------------------------------------------------------- synthetic corpus


def test_synthetic_corpus_is_deterministic_per_seed():
    def documents(seed):
        corpus, rng = data.SyntheticCorpus(seed), np.random.default_rng(7)
        return [corpus.sample_document(rng) for _ in range(5)]

    first, again, other = documents(0), documents(0), documents(1)
    for (topic_a, doc_a), (topic_b, doc_b) in zip(first, again):
        assert topic_a == topic_b and np.array_equal(doc_a, doc_b)
    assert any(
        doc_a.shape != doc_b.shape or not np.array_equal(doc_a, doc_b)
        for (_, doc_a), (_, doc_b) in zip(first, other)
    )
    assert not np.array_equal(data.SyntheticCorpus(0).alphabets, data.SyntheticCorpus(1).alphabets)
    b0, b0_again, b1 = dataset(seed=0).batch(0), dataset(seed=0).batch(0), dataset(seed=1).batch(0)
    np.testing.assert_array_equal(b0["targets"], b0_again["targets"])
    assert not np.array_equal(b0["targets"], b1["targets"])


def test_synthetic_documents_follow_their_chain():
    corpus, rng = data.SyntheticCorpus(3), np.random.default_rng(0)
    counts = np.zeros((corpus.num_topics, 64, 64))
    for _ in range(400):
        topic, document = corpus.sample_document(rng)
        assert 32 <= document.size <= 256 and document.dtype == np.uint8
        local = np.searchsorted(corpus.alphabets[topic], document)
        np.testing.assert_array_equal(corpus.alphabets[topic][local], document)  # own alphabet
        np.add.at(counts[topic], (local[:-1], local[1:]), 1)
    # Every observed transition is one of the chain's; the frequencies match its probabilities.
    expected = np.zeros_like(counts)
    topics, states = np.indices(corpus.successors.shape[:2])
    for s in range(corpus.successors.shape[2]):
        expected[topics, states, corpus.successors[..., s]] = corpus.successor_probs[..., s]
    assert np.all(counts[expected == 0] == 0)
    visits = counts.sum(-1, keepdims=True)
    well_visited = visits[..., 0] >= 200
    error = np.abs(counts / np.maximum(visits, 1) - expected).max(-1)
    assert well_visited.sum() > 20 and error[well_visited].max() < 0.12  # sd <= 0.035 at 200 visits


def test_synthetic_topics_are_distinguishable():
    # "Experts have something to specialise on": each topic's bigram statistics identify it.
    # Fit add-one bigram models per topic on one sample, classify documents of another.
    corpus, rng = data.SyntheticCorpus(0), np.random.default_rng(5)
    log_probs = np.ones((corpus.num_topics, 256, 256))
    for _ in range(400):
        topic, document = corpus.sample_document(rng)
        np.add.at(log_probs[topic], (document[:-1], document[1:]), 1)
    log_probs = np.log(log_probs / log_probs.sum(-1, keepdims=True))
    correct = 0
    for _ in range(200):
        topic, document = corpus.sample_document(rng)
        scores = log_probs[:, document[:-1], document[1:]].sum(-1)
        correct += int(np.argmax(scores) == topic)
    assert correct >= 196  # 98%; chance is 1/8
    # Topic bigram distributions are far apart: total variation between any two topics > 0.9.
    bigram_counts = np.zeros((corpus.num_topics, 256, 256))
    for _ in range(400):
        topic, document = corpus.sample_document(rng)
        np.add.at(bigram_counts[topic], (document[:-1], document[1:]), 1)
    joint = bigram_counts / bigram_counts.sum((1, 2), keepdims=True)
    for a in range(corpus.num_topics):
        for b in range(a):
            assert 0.5 * np.abs(joint[a] - joint[b]).sum() > 0.9


# ---------------------------------------------------------------- datasets: synthetic


def test_synthetic_lm_batch_shapes_and_invariants():
    ds = dataset(batch_size=6, seq_len=96)
    batch = ds.batch(0)
    check_lm_batch(batch, 6, 96)
    assert ds.element_spec == {k: (v.shape, v.dtype) for k, v in batch.items()}
    # Documents are packed without padding; each complete piece ends with eos.
    assert np.all(batch["segment_ids"] > 0)
    targets, segments = batch["targets"], batch["segment_ids"]
    ends = segments[:, :-1] != segments[:, 1:]
    assert np.all(targets[:, :-1][ends] == data.EOS_ID)
    validation = dataset(split="validation", batch_size=6, seq_len=96).batch(0)
    assert not np.array_equal(validation["targets"], targets)


def test_span_corruption_batch_restores_rows():
    ds = dataset(task="span_corruption", batch_size=3, seq_len=64, inputs_length=128)
    batch = ds.batch(2)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((3, 128 if k.startswith("encoder") else 29), np.dtype(t)) for k, t in SPAN_SPEC.items()
    }
    for row in range(3):
        inputs, targets = batch["encoder_inputs"][row], batch["decoder_targets"][row]
        restored = restore_spans(inputs, targets)
        assert restored.size == 141  # span_corruption_lengths(128, 0.15, 3) -> (141, 29)
        assert np.all((restored == data.EOS_ID) | ((restored >= 3) & (restored < 259)))
        np.testing.assert_array_equal(batch["decoder_inputs"][row], np.r_[0, targets[:-1]])
        np.testing.assert_array_equal(batch["decoder_weights"][row], targets != 0)
        np.testing.assert_array_equal(batch["encoder_segment_ids"][row], inputs != 0)
        np.testing.assert_array_equal(
            batch["decoder_positions"][row], np.arange(29) * (targets != 0)
        )


# ---------------------------------------------------------------- resume and sharding


@pytest.mark.parametrize("task", ["lm", "span_corruption"])
def test_resume_reproduces_the_uninterrupted_batches(task):
    uninterrupted = dataset(task=task).iterate()
    reference = [next(uninterrupted) for _ in range(6)]
    resumed = dataset(task=task).iterate(start_step=3)  # a fresh object, as after a restart
    for step in range(3, 6):
        batch = next(resumed)
        assert batch.keys() == reference[step].keys()
        for key, value in batch.items():
            np.testing.assert_array_equal(value, reference[step][key])
    key = "targets" if task == "lm" else "decoder_targets"
    np.testing.assert_array_equal(dataset(task=task).batch(4)[key], reference[4][key])
    assert not np.array_equal(reference[3][key], reference[4][key])  # steps differ


def test_process_shards_make_up_the_global_batch():
    full = dataset(batch_size=8).batch(5)
    shards = [dataset(batch_size=8, process_index=p, process_count=4).batch(5) for p in range(4)]
    for key in full:
        assert shards[0][key].shape[0] == 2
        np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), full[key])


def test_dataset_from_config_follows_model_kind():
    config = default_config()
    with config.unlocked():
        config.model.vocab_size = 384
        config.train.batch_size, config.train.seq_len = 2, 16
    decoder = data.dataset_from_config(config, "train").batch(0)
    check_lm_batch(decoder, 2, 16)
    config.model.kind = "encoder_decoder"
    encoder_decoder = data.dataset_from_config(config, "validation", process_count=2).batch(0)
    assert set(encoder_decoder) == set(SPAN_SPEC)
    assert encoder_decoder["encoder_inputs"].shape == (1, 16)
    config.model.vocab_size = 256  # the default config's vocabulary has no room for specials
    with pytest.raises(ValueError, match="vocab_size 256 is too small"):
        data.dataset_from_config(config, "train")


# ---------------------------------------------------------------- text files


def test_text_file_source_split_and_round_trip(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"a" * 900 + b"b" * 100)  # 1000 bytes: train 0..899, validation 900..999
    train = dataset(f"text:{path}", seq_len=900, batch_size=2).batch(0)
    validation = dataset(f"text:{path}", split="validation", seq_len=100, batch_size=2).batch(0)
    check_lm_batch(train, 2, 900)
    check_lm_batch(validation, 2, 100)
    # A stream row is one segment: the crop itself (the whole split here).
    np.testing.assert_array_equal(train["targets"], np.full((2, 900), ord("a") + 3))
    np.testing.assert_array_equal(validation["targets"], np.full((2, 100), ord("b") + 3))
    with pytest.raises(ValueError, match="100 tokens, fewer than the 101"):
        dataset(f"text:{path}", split="validation", seq_len=101)

    text = "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. 東京 🚀\n" * 20
    path.write_text(text, encoding="utf-8")
    rows = dataset(f"text:{path}", seq_len=64, batch_size=4).batch(3)["targets"]
    tokenizer, raw = data.ByteTokenizer(), text.encode("utf-8")
    for row in rows:  # every row is a crop of the file's first 90% of bytes
        crop = (row - 3).astype(np.uint8).tobytes()
        assert crop in raw[: int(len(raw) * 0.9)]
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=0, max_size=12),
    st.integers(1, 16),
)
def test_full_pass_rows_pack_like_pack_sequences(lengths, length):
    # The lazy row builder of a full pass gives exactly the rows of spans.pack_sequences over
    # the same documents (every token once, in order, documents split across rows).
    documents = [np.arange(n, dtype=np.int32) + 3 + i for i, n in enumerate(lengths)]
    source = data.DocumentSource(
        sample_document=None, description="documents", documents=lambda: iter(documents)
    )
    rows = list(source.sequential_rows(length))
    if sum(lengths) == 0:
        assert rows == []
        return
    expected = spans.pack_sequences(documents, length)
    for got, key in zip(zip(*rows), ("tokens", "segment_ids", "positions")):
        np.testing.assert_array_equal(np.stack(got), expected[key])


def test_full_pass_reads_every_validation_token_once_across_processes(tmp_path):
    path = tmp_path / "corpus.txt"
    text = bytes(range(32, 127)) * 20  # 1900 bytes: validation is the last 190
    path.write_bytes(text)
    expected = np.frombuffer(text[1710:], np.uint8).astype(np.int32) + data.BYTE_OFFSET
    single = list(dataset(f"text:{path}", split="validation", batch_size=4, seq_len=16).full_pass())
    # 190 tokens in rows of 16: 12 rows, the last with 14 tokens; batches of 4 rows: 3 batches
    assert len(single) == 3 and all(batch["targets"].shape == (4, 16) for batch in single)
    targets = np.concatenate([batch["targets"] for batch in single])
    weights = np.concatenate([batch["weights"] for batch in single])
    np.testing.assert_array_equal(targets[weights > 0], expected)
    shares = [
        list(
            dataset(
                f"text:{path}",
                split="validation",
                batch_size=4,
                seq_len=16,
                process_index=index,
                process_count=2,
            ).full_pass()
        )
        for index in range(2)
    ]
    for step, batch in enumerate(single):
        for key in batch:
            joined = np.concatenate([shares[0][step][key], shares[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])


def test_full_pass_of_odd_row_count_pads_with_weightless_rows(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"x" * 500)  # validation: 50 bytes, rows of 16: 4 rows, batches of 3
    batches = list(
        dataset(f"text:{path}", split="validation", batch_size=3, seq_len=16).full_pass()
    )
    assert len(batches) == 2
    assert batches[1]["weights"].sum(axis=1).tolist() == [2.0, 0.0, 0.0]  # 50 = 3 * 16 + 2
    assert batches[0]["weights"].sum() == 48.0


def test_full_pass_span_corruption_is_finite_and_deterministic(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    make = lambda: dataset(
        f"text:{path}", task="span_corruption", split="validation", batch_size=2, seq_len=32
    )
    first, second = list(make().full_pass()), list(make().full_pass())
    assert len(first) >= 2
    for a, b in zip(first, second, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert all(batch["decoder_weights"].sum() > 0 for batch in first[:-1])


def test_full_pass_of_the_synthetic_corpus_is_refused():
    with pytest.raises(ValueError, match="has no end.*train.eval_steps"):
        dataset("synthetic", split="validation").full_pass()


def test_text_file_span_corruption(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    batch = dataset(f"text:{path}", task="span_corruption", seq_len=64, batch_size=2).batch(1)
    assert batch["encoder_inputs"].shape == (2, 64)
    restored = restore_spans(batch["encoder_inputs"][0], batch["decoder_targets"][0])
    assert data.ByteTokenizer().decode(restored) in path.read_text()


# ---------------------------------------------------------------- bad input


def test_bad_input_errors(tmp_path):
    missing = tmp_path / "no_such.txt"
    with pytest.raises(ValueError, match="no_such.txt"):
        dataset(f"text:{missing}")
    with pytest.raises(ValueError, match="'synthetic', 'text:PATH', 'python_stdlib', 'tfds:lm1b'"):
        dataset("wikipedia")
    with pytest.raises(ValueError, match="'tfds:tiny_shakespeare'"):
        dataset("tfds:imagenet")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world, " * 5)  # 65 bytes: 58 train bytes
    with pytest.raises(ValueError, match="58 tokens, fewer than the 64"):
        dataset(f"text:{tiny}", seq_len=64)
    with pytest.raises(ValueError, match="vocab_size=384"):
        dataset(vocab_size=256)
    with pytest.raises(ValueError, match=r"uses 39 sentinels .*vocab_size >= 298"):
        # 700 encoder tokens hold 777 raw ones: noise round(116.55) = 117, spans round(39.0) = 39
        # (777 - 117 + 39 + 1 = 700), and 259 + 39 = 298 ids are needed.
        dataset(task="span_corruption", inputs_length=700, vocab_size=297)
    with pytest.raises(ValueError, match="split"):
        dataset(split="test")
    with pytest.raises(ValueError, match="task"):
        dataset(task="mlm")
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        dataset(batch_size=4, process_count=3)
    with pytest.raises(ValueError, match="step"):
        dataset().batch(-1)
    with pytest.raises(ValueError, match="seed"):
        dataset(seed=-1)


# ---------------------------------------------------------------- TFDS (no network)


def build_fake_tfds(name, version, splits, data_dir):
    """Prepares a tiny ArrayRecord dataset under the registered `name`, without network."""
    import tensorflow_datasets as tfds

    class FakeText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(texts) for split, texts in splits.items()}

        def _generate_examples(self, texts):
            for index, text in enumerate(texts):
                yield index, {"text": text}

    FakeText.name = name
    FakeText(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")


@pytest.mark.parametrize("name", ["tiny_shakespeare", "c4"])
def test_unprepared_tfds_fails_fast(name, tmp_path, no_network):
    start = time.monotonic()
    with pytest.raises(ValueError) as error:
        dataset(f"tfds:{name}", data_dir=str(tmp_path))
    assert time.monotonic() - start < 20  # seconds, never a download or retry loop
    message = str(error.value)
    builder = "c4/en" if name == "c4" else name
    assert f"tfds build {builder} --file_format=array_record" in message
    assert "--config.data.download=True" in message and str(tmp_path) in message


def test_tfds_download_is_asked_only_when_configured(tmp_path, monkeypatch, no_network):
    import tensorflow_datasets as tfds

    calls = []

    def fake_download_and_prepare(self, **kwargs):
        calls.append((self.name, kwargs))
        raise RuntimeError("stop here")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fake_download_and_prepare)
    with pytest.raises(ValueError, match="not prepared"):
        dataset("tfds:lm1b", data_dir=str(tmp_path))
    assert calls == []
    with pytest.raises(RuntimeError, match="stop here"):
        dataset("tfds:lm1b", data_dir=str(tmp_path), download=True)
    assert calls == [("lm1b", {"file_format": "array_record"})]


def test_tfds_lm1b_documents_are_packed(tmp_path, no_network):
    sentences = ["The cat sat.", "Dogs bark loudly at night.", "Ünïcödé ok.", "x"]
    build_fake_tfds("lm1b", "1.1.0", {"train": sentences, "test": ["held out."]}, tmp_path)
    batch = dataset("tfds:lm1b", data_dir=str(tmp_path), batch_size=3, seq_len=40).batch(0)
    check_lm_batch(batch, 3, 40)
    tokenizer = data.ByteTokenizer()
    for row in range(3):
        segments = batch["segment_ids"][row]
        for segment in range(1, segments.max() + 1):
            piece = tokenizer.decode(batch["targets"][row][segments == segment])
            assert any(piece in s for s in sentences), piece  # a (possibly cut) sentence
    validation = dataset(
        "tfds:lm1b", data_dir=str(tmp_path), split="validation", batch_size=1, seq_len=30
    ).batch(0)
    # "held out." + eos is 10 tokens: three copies fill 30 tokens.
    expected = np.tile(np.r_[tokenizer.encode("held out."), 1], 3)
    np.testing.assert_array_equal(validation["targets"][0], expected)
    # Each document's inputs are the start token 0, then its text: 0 h e l d ' ' o u t . | 0 h ...
    held_out_inputs = np.tile(np.r_[0, tokenizer.encode("held out.")], 3)
    np.testing.assert_array_equal(validation["inputs"][0], held_out_inputs)
    np.testing.assert_array_equal(validation["segment_ids"][0], np.repeat([1, 2, 3], 10))


def test_tfds_tiny_shakespeare_is_a_stream(tmp_path, no_network):
    splits = {"train": ["First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3]}
    splits.update(validation=["ROMEO:\nBut soft, what light.\n" * 3], test=["unused"])
    build_fake_tfds("tiny_shakespeare", "1.0.0", splits, tmp_path)
    ds = dataset("tfds:tiny_shakespeare", data_dir=str(tmp_path), seq_len=48, batch_size=2)
    batch = ds.batch(0)
    check_lm_batch(batch, 2, 48)
    assert np.all(batch["segment_ids"] == 1)
    stream = np.r_[data.ByteTokenizer().encode(splits["train"][0]), 1]
    for row in batch["targets"]:
        starts = [i for i in range(stream.size - 47) if np.array_equal(stream[i : i + 48], row)]
        assert starts, "each row is a crop of the train text"
    span = dataset(
        "tfds:tiny_shakespeare",
        data_dir=str(tmp_path),
        split="validation",
        task="span_corruption",
        seq_len=32,
        batch_size=2,
    ).batch(0)
    restored = restore_spans(span["encoder_inputs"][1], span["decoder_targets"][1])
    assert data.ByteTokenizer().decode(restored) in splits["validation"][0]


# ---------------------------------------------------------------- python_stdlib


def test_python_stdlib_split_is_sorted_disjoint_and_follows_the_path_hash(tmp_path):
    names = [f"pkg{i % 3}/mod_{i}.py" for i in range(60)] + ["top.py", "notes.txt"]
    names += ["site-packages/third.py", "pkg0/__pycache__/cached.py", "dist-packages/x.py"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    splits = data.python_stdlib_files(tmp_path)
    assert splits == data.python_stdlib_files(tmp_path)  # deterministic
    relative = {
        s: [p.relative_to(tmp_path).as_posix() for p in files] for s, files in splits.items()
    }
    kept = sorted(n for n in names[:61])  # the .py files outside the excluded directories
    assert sorted(relative["train"] + relative["validation"]) == kept
    assert not set(relative["train"]) & set(relative["validation"])
    for split, files in relative.items():
        assert files == sorted(files)
        for name in files:  # binascii's crc32 as the oracle of the rule
            assert (binascii.crc32(name.encode()) % 10 == 0) == (split == "validation"), name
    assert 1 <= len(relative["validation"]) <= 20
    with pytest.raises(ValueError, match="does not exist"):
        data.python_stdlib_files(tmp_path / "missing")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "a.py").write_text("")
    with pytest.raises(ValueError, match="too few .py files"):
        data.python_stdlib_files(tmp_path / "lonely")


def test_python_stdlib_loads_without_network_and_is_recorded(no_network):
    splits = data.python_stdlib_files()
    assert Path(sysconfig.get_paths()["stdlib"]) / "os.py" in splits["train"] + splits["validation"]
    assert not set(splits["train"]) & set(splits["validation"])
    facts = data.python_stdlib_facts()
    assert facts["python_version"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert facts["train_files"] == len(splits["train"]) > 1000
    assert 0.05 < facts["validation_bytes"] / (facts["train_bytes"] + facts["validation_bytes"])
    assert facts["validation_bytes"] / facts["train_bytes"] < 0.25
    for split in data.SPLITS:
        raw = b"".join(path.read_bytes() + b"\0" for path in splits[split])  # eos as NUL
        batch = dataset("python_stdlib", split=split, seq_len=64, batch_size=3).batch(5)
        check_lm_batch(batch, 3, 64)
        for row in batch["targets"]:
            assert (np.where(row == data.EOS_ID, 0, row - 3).astype(np.uint8).tobytes()) in raw
    config = default_config()
    config.data.name = "python_stdlib"
    assert run_identity.resolve(config).data.corpus.to_dict() == facts
    assert "corpus" not in run_identity.resolve(default_config()).data

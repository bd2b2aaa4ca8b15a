"""Training data: a synthetic corpus, local text files and TFDS text datasets, as batches.

Every batch is a pure function of (seed, split, step, row): `make_dataset(...).batch(step)` draws
row r of step s from `np.random.default_rng([seed, split_code, s, r])`, so a run resumed at step s
sees exactly the batches an uninterrupted run would, and the checkpoint needs only the step.
Rows are sampled with replacement (no epochs). Each process builds only its slice of the global
batch. (grain's samplers, packers and checkpointable iterators would change which tokens fill a
batch, moving recorded results, and add an iterator state to checkpoints that need only the
step.) Evaluation may instead read a finite split once, in order (`Dataset.full_pass`): a text
stream cut into consecutive rows, TFDS documents packed in order; the synthetic corpus has no
finite split.

Sources (`data.name`):
  'synthetic'             documents from `SyntheticCorpus`, built in code (the default);
  'text:PATH'             a local file as one byte stream; the last 10% is the validation split;
  'tiny_shakespeare'      the tiny Shakespeare text (Karpathy's char-rnn corpus, public domain,
                          1,115,394 bytes) from the gzip copy in `moe_jax/corpora/`, read as
                          'text:PATH' reads the plain file (the corpus of experiments/RESULTS.md);
  'python_stdlib'         the running CPython's standard library `.py` files (about 31 MB for
                          3.11), found with `sysconfig`, no download; a file-level split (see
                          `python_stdlib_files`), each split one byte stream of its files in
                          sorted order, each file followed by eos;
  'tfds:lm1b', 'tfds:c4'  TFDS documents (validation split: lm1b 'test', c4 'validation');
  'tfds:tiny_shakespeare' TFDS text as one byte stream per split.
TFDS is imported only for 'tfds:' names and read with `as_data_source` (ArrayRecord, no
TensorFlow); nothing is downloaded unless `download=True`.

Token layout (ByT5-style, shared by every source): pad 0, eos 1, unk 2, byte b is b + 3, so
bytes take ids 3..258. vocab_size must be >= 259; span corruption takes its sentinels from the
top of the vocabulary (`moe_jax.spans`), so it needs vocab_size >= 259 + the sentinels of a row.
384 (= 259 + 125 sentinels, a multiple of 128) fits both tasks.

Tasks and batch keys (b = batch_size // process_count rows on this process):
  'lm' (decoder-only, next-token prediction), length L = seq_len:
      inputs i32[b, L], targets i32[b, L], weights f32[b, L], segment_ids i32[b, L],
      positions i32[b, L]. Rows are packed: segment_ids number the documents in a row from 1
      (0 is padding) and positions restart at 0 in each; inputs are the targets shifted right
      inside each segment, with pad (0) as the start token, as T5X does.
  'span_corruption' (encoder-decoder), Li = inputs_length (or seq_len), Lt derived from it:
      encoder_inputs, encoder_segment_ids, encoder_positions i32[b, Li]; decoder_inputs,
      decoder_targets, decoder_segment_ids, decoder_positions i32[b, Lt]; decoder_weights
      f32[b, Lt]. Rows are single segments (id 1) padded with 0.
"""

import bisect
import dataclasses
import functools
import gzip
import os
import platform
import sysconfig
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from moe_jax import spans
from moe_jax.config import DECODER_KINDS, KINDS

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BYTE_OFFSET = 3
MIN_VOCAB_SIZE = BYTE_OFFSET + 256  # 259: the specials and the 256 bytes
VALIDATION_FRACTION = 0.1  # text files: the last 10% of the bytes (as nanoGPT splits)
SPLITS = ("train", "validation")
TASKS = ("lm", "span_corruption")
NAME_FORMS = (
    "'synthetic', 'text:PATH', 'python_stdlib', 'tfds:lm1b', 'tfds:c4', 'tfds:tiny_shakespeare' "
    "or 'tiny_shakespeare' (the copy in moe_jax/corpora)"
)
# corpora shipped in the package: data.name -> gzip file in moe_jax/corpora/
BUNDLED_TEXTS = {"tiny_shakespeare": "tinyshakespeare.txt.gz"}
PYTHON_STDLIB = "python_stdlib"
# python_stdlib: a file goes to validation when crc32 of its path (relative to the stdlib
# directory, '/'-separated) is 0 modulo this; about 10% of the files, and a file's split does
# not move when other files come or go between Python versions.
STDLIB_VALIDATION_MODULUS = 10
# third-party packages installed beside the stdlib, which differ between machines
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")
_CORPUS_STREAM = 1_000_003  # keeps the corpus's own random draws apart from the row streams
_FULL_PASS_STREAM = 1_000_033  # and a full pass's span-corruption draws (in place of a step)


class ByteTokenizer:
    """UTF-8 bytes to ids: byte b -> b + 3; ids 0, 1, 2 are pad, eos and unk."""

    def encode(self, text: str | bytes, add_eos: bool = False) -> np.ndarray:
        """i32[N] (N + 1 with add_eos): the ids of the UTF-8 bytes of `text`."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + BYTE_OFFSET
        return np.append(ids, EOS_ID).astype(np.int32) if add_eos else ids

    def decode(self, ids) -> str:
        """Text of the byte ids in `ids`; specials and sentinels are dropped."""
        ids = np.asarray(ids).reshape(-1)
        byte_ids = ids[(ids >= BYTE_OFFSET) & (ids < MIN_VOCAB_SIZE)] - BYTE_OFFSET
        return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SyntheticCorpus:
    """Documents from a mixture of topic-specific sparse Markov chains over the 256 bytes.

    Each topic owns a random alphabet of `alphabet_size` byte values (topics overlap by chance)
    and a first-order chain on it in which every symbol has `branching` successors with
    Dirichlet(1) probabilities. A document picks one topic uniformly, a uniform start symbol and
    a length uniform in [min_document_length, max_document_length]. Which chain generated a
    document shows in its bigrams, so experts have topics to specialise on; the best possible
    loss is the chains' entropy rate (at most log(branching) per token).

    Attributes (all fixed by `seed`):
      alphabets: u8[K, A] byte values of each topic.
      successors: i64[K, A, S] next symbol, as an index into the topic's alphabet.
      successor_probs: f64[K, A, S] its probability.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        num_topics: int = 8,
        alphabet_size: int = 64,
        branching: int = 4,
        min_document_length: int = 32,
        max_document_length: int = 256,
    ):
        if not 1 <= branching <= alphabet_size <= 256 or num_topics < 1:
            raise ValueError(
                "SyntheticCorpus needs num_topics >= 1 and 1 <= branching <= alphabet_size <= "
                f"256, got num_topics={num_topics}, branching={branching}, "
                f"alphabet_size={alphabet_size}."
            )
        if not 1 <= min_document_length <= max_document_length:
            raise ValueError(
                "SyntheticCorpus needs 1 <= min_document_length <= max_document_length, got "
                f"{min_document_length} and {max_document_length}."
            )
        rng = np.random.default_rng([_check_seed(seed), _CORPUS_STREAM])
        self.alphabets = np.stack(
            [np.sort(rng.choice(256, alphabet_size, replace=False)) for _ in range(num_topics)]
        ).astype(np.uint8)  # [K, A]
        self.successors = np.stack(
            [
                rng.choice(alphabet_size, branching, replace=False)
                for _ in range(num_topics * alphabet_size)
            ]
        ).reshape(num_topics, alphabet_size, branching)  # [K, A, S]
        self.successor_probs = rng.dirichlet(
            np.ones(branching), size=(num_topics, alphabet_size)
        )  # [K, A, S]
        self.document_lengths = (min_document_length, max_document_length)
        # Python lists make the per-token loop of `sample_document` fast.
        self._successor_lists = self.successors.tolist()
        self._thresholds = np.cumsum(self.successor_probs, axis=-1)[..., :-1].tolist()

    @property
    def num_topics(self) -> int:
        return self.alphabets.shape[0]

    def sample_document(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """(topic, u8[N] bytes) of one document drawn with `rng`."""
        topic = int(rng.integers(self.num_topics))
        length = int(rng.integers(self.document_lengths[0], self.document_lengths[1] + 1))
        uniforms = rng.random(length).tolist()
        successors, thresholds = self._successor_lists[topic], self._thresholds[topic]
        symbol = int(rng.integers(self.alphabets.shape[1]))
        symbols = []
        for uniform in uniforms:
            symbols.append(symbol)
            symbol = successors[symbol][bisect.bisect_right(thresholds[symbol], uniform)]
        return topic, self.alphabets[topic][symbols]


def _check_seed(seed) -> int:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    return int(seed)


@dataclasses.dataclass(frozen=True)
class StreamSource:
    """One long token stream (a text file, tiny_shakespeare); rows are random crops of it."""

    tokens: np.ndarray  # u16[N] token ids
    description: str

    def packed_row(self, rng: np.random.Generator, length: int):
        """(tokens, segment_ids, positions), each i32[length]: a crop as a single segment."""
        start = int(rng.integers(self.tokens.size - length + 1))
        crop = self.tokens[start : start + length].astype(np.int32)
        return crop, np.ones(length, np.int32), np.arange(length, dtype=np.int32)

    def sequential_rows(self, length: int):
        """(tokens, segment_ids, positions) rows, each i32[length]: the whole stream once, cut
        into consecutive rows, the last one padded (segment id 0)."""
        return _packed_rows([self.tokens], length)

    def check_length(self, length: int) -> None:
        if self.tokens.size < length:
            raise ValueError(
                f"{self.description} has {self.tokens.size} tokens, fewer than the {length} "
                "one row needs; use a longer text or a shorter seq_len (or inputs_length)."
            )


@dataclasses.dataclass(frozen=True)
class DocumentSource:
    """Documents drawn at random; rows pack them (each ends with eos) as segments."""

    sample_document: Callable[[np.random.Generator], np.ndarray]  # -> i32[N] ids ending in eos
    description: str
    # every document of a finite split in order (None: the split has no end, e.g. synthetic)
    documents: Callable[[], Iterator[np.ndarray]] | None = None

    def packed_row(self, rng: np.random.Generator, length: int):
        """(tokens, segment_ids, positions), each i32[length], with no padding.

        Documents are drawn until they fill the row; a document longer than the row gives a
        random crop of `length` tokens; the last one is cut at the end of the row.
        """
        documents, total = [], 0
        while total < length:
            document = self.sample_document(rng)
            if document.size > length:
                start = int(rng.integers(document.size - length + 1))
                document = document[start : start + length]
            documents.append(document)
            total += document.size
        return _first_row(documents, length)

    def sequential_rows(self, length: int):
        """(tokens, segment_ids, positions) rows, each i32[length]: every document once, in
        order, packed (a document crossing a row boundary continues in the next row)."""
        if self.documents is None:
            raise ValueError(
                f"{self.description} has no end, so it cannot be read in one full pass; set "
                "train.eval_steps to a number of batches (e.g. 4), or use a text file or a TFDS "
                "corpus (data.name='text:PATH' or 'tfds:...')."
            )
        return _packed_rows(self.documents(), length)

    def check_length(self, length: int) -> None:
        del length  # documents are drawn until any row length is filled


def _first_row(sequences, length: int):
    """(tokens, segment_ids, positions), each i32[length]: the first row that
    `spans.pack_sequences` makes of `sequences`."""
    packed = spans.pack_sequences(sequences, length, pad_id=PAD_ID)
    return packed["tokens"][0], packed["segment_ids"][0], packed["positions"][0]


def _packed_rows(sequences, length: int):
    """The rows of `spans.pack_sequences(sequences, length)`, built one at a time (a split may
    not fit in memory as rows), each (tokens, segment_ids, positions) i32[length]."""
    row, filled = [], 0
    for sequence in sequences:
        rest = np.asarray(sequence, np.int32).reshape(-1)
        while rest.size:
            piece, rest = rest[: length - filled], rest[length - filled :]
            row.append(piece)
            filled += piece.size
            if filled == length:  # a piece that continues in the next row starts a segment there
                yield _first_row(row, length)
                row, filled = [], 0
    if row:
        yield _first_row(row, length)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Batches as a pure function of the step; `batch(step)` is this process's rows."""

    row_fn: Callable[[np.random.Generator], dict[str, np.ndarray]]
    split: str
    batch_size: int  # global rows per step
    seed: int
    process_index: int = 0
    process_count: int = 1
    # the split's rows read once in order (see `full_pass`)
    full_pass_rows: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def full_pass(self) -> Iterator[dict[str, np.ndarray]]:
        """This process's share of the split read once, in order, as batches like `batch(step)`:
        global batch n holds rows [n * batch_size, (n + 1) * batch_size) and the last one is
        filled up with rows of weight 0, so every token counts exactly once. Raises ValueError
        (naming the fix) for a split that has no end, such as the synthetic corpus.
        """
        if self.full_pass_rows is None:
            raise ValueError(f"this {self.split} dataset was built without a full pass.")
        rows = self.full_pass_rows()  # raises here, not at the first batch, for an endless split
        first_row = self.process_index * self.local_batch_size
        mine = range(first_row, first_row + self.local_batch_size)
        spec = self.element_spec
        empty = {key: np.zeros(shape[1:], dtype) for key, (shape, dtype) in spec.items()}

        def batches():
            kept, index = [], -1
            for index, row in enumerate(rows):
                if index % self.batch_size in mine:
                    kept.append(row)
                if index % self.batch_size == self.batch_size - 1:
                    yield {key: np.stack([row[key] for row in kept]) for key in kept[0]}
                    kept = []
            if (index + 1) % self.batch_size:  # a last, partial global batch
                kept += [empty] * (self.local_batch_size - len(kept))
                yield {key: np.stack([row[key] for row in kept]) for key in empty}

        return batches()

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The rows [p * b, (p + 1) * b) of the global batch of `step` (p = process_index)."""
        if int(step) != step or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}.")
        first_row = self.process_index * self.local_batch_size
        split_code = SPLITS.index(self.split)
        rows = [
            self.row_fn(np.random.default_rng([self.seed, split_code, int(step), first_row + i]))
            for i in range(self.local_batch_size)
        ]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def iterate(self, start_step: int = 0):
        """Yields batch(start_step), batch(start_step + 1), ... for ever."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    @property
    def element_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{key: (shape, dtype)} of `batch(step)`, read off one row."""
        row = self.row_fn(np.random.default_rng([self.seed, SPLITS.index(self.split), 0, 0]))
        return {key: ((self.local_batch_size, *v.shape), v.dtype) for key, v in row.items()}


def _text_file_source(path: str, split: str) -> StreamSource:
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"data.name='text:{path}': no such file {str(file.resolve())!r}; give the path of "
            "a UTF-8 (or any byte) text file."
        )
    return _byte_stream_source(file.read_bytes(), split, f"text file {path!r}")


def _bundled_text_source(name: str, split: str) -> StreamSource:
    file = Path(__file__).parent / "corpora" / BUNDLED_TEXTS[name]
    return _byte_stream_source(gzip.decompress(file.read_bytes()), split, f"corpus {name!r}")


def _byte_stream_source(text: bytes, split: str, what: str) -> StreamSource:
    """The byte stream of `split` of `text`: the first 90% for training, the rest validation."""
    data = np.frombuffer(text, dtype=np.uint8)
    num_train = int(data.size * (1.0 - VALIDATION_FRACTION))
    part = data[:num_train] if split == "train" else data[num_train:]
    return StreamSource(
        tokens=part.astype(np.uint16) + BYTE_OFFSET,
        description=f"the {split} split of {what} ({data.size} bytes in all)",
    )


def python_stdlib_files(root: str | Path | None = None) -> dict[str, list[Path]]:
    """{'train': [...], 'validation': [...]}: the `.py` files under `root` in sorted order.

    `root` defaults to the running interpreter's stdlib directory
    (`sysconfig.get_paths()['stdlib']`); directories named in `STDLIB_EXCLUDED_DIRS` are skipped.
    A file is in validation when `zlib.crc32` of its '/'-separated path relative to `root` is 0
    modulo `STDLIB_VALIDATION_MODULUS`, otherwise in train.
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not root.is_dir():
        raise ValueError(
            f"data.name='{PYTHON_STDLIB}': the standard library directory {str(root)!r} does not "
            "exist; this Python was installed without its library sources."
        )
    relative_paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in STDLIB_EXCLUDED_DIRS]
        relative = Path(directory).relative_to(root)
        relative_paths += [(relative / name).as_posix() for name in files if name.endswith(".py")]
    splits: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for relative in sorted(relative_paths):
        is_validation = zlib.crc32(relative.encode()) % STDLIB_VALIDATION_MODULUS == 0
        splits["validation" if is_validation else "train"].append(root / relative)
    if not splits["train"] or not splits["validation"]:
        raise ValueError(
            f"data.name='{PYTHON_STDLIB}': {str(root)!r} holds too few .py files for a train and "
            f"a validation split ({len(splits['train'])} and {len(splits['validation'])})."
        )
    return splits


@functools.cache
def python_stdlib_facts() -> dict:
    """What `data.name='python_stdlib'` reads here: the Python version and the number of files
    and bytes per split (train.py records them in the run's config as `data.corpus`)."""
    facts: dict = {"python_version": platform.python_version()}
    for split, files in python_stdlib_files().items():
        facts[f"{split}_files"] = len(files)
        facts[f"{split}_bytes"] = sum(path.stat().st_size for path in files)
    return facts


@functools.cache
def _python_stdlib_tokens(split: str) -> np.ndarray:
    """u16[N]: the split's files in order as byte ids, each followed by eos."""
    ids = []
    for path in python_stdlib_files()[split]:
        ids.append(np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint16) + BYTE_OFFSET)
        ids.append(np.array([EOS_ID], np.uint16))
    return np.concatenate(ids)


def _python_stdlib_source(split: str) -> StreamSource:
    facts = python_stdlib_facts()
    description = (
        f"the {split} split of the Python {facts['python_version']} standard library "
        f"({facts[f'{split}_files']} files, {facts[f'{split}_bytes']} bytes)"
    )
    return StreamSource(tokens=_python_stdlib_tokens(split), description=description)


def corpus_facts(name: str) -> dict | None:
    """Facts that identify the corpus `name` (a `data.name`) beyond its name, or None."""
    return python_stdlib_facts() if name == PYTHON_STDLIB else None


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
    builder: str
    splits: dict[str, str]  # our split -> the dataset's split
    is_stream: bool  # one long text per split (rows are crops) rather than many documents


TFDS_DATASETS = {
    "lm1b": _TfdsSpec("lm1b", {"train": "train", "validation": "test"}, is_stream=False),
    "c4": _TfdsSpec("c4/en", {"train": "train", "validation": "validation"}, is_stream=False),
    "tiny_shakespeare": _TfdsSpec(
        "tiny_shakespeare", {"train": "train", "validation": "validation"}, is_stream=True
    ),
}


def open_tfds_split(name: str, split: str, *, data_dir: str | None, download: bool) -> Sequence:
    """The random-access records (dicts with a 'text' entry) of one TFDS split.

    Raises ValueError within seconds, naming the preparation command, when the dataset is not
    prepared in `data_dir` (TFDS's default when None) and `download` is False.
    """
    spec = TFDS_DATASETS[name]
    try:
        import tensorflow_datasets as tfds

        if name == "c4":
            import tensorflow_datasets.text.c4  # registers c4, which TFDS skips without TF
    except ImportError as error:
        raise ValueError(
            f"data.name='tfds:{name}' needs tensorflow-datasets and array_record: "
            f"`pip install tensorflow-datasets array_record` ({error})."
        ) from error
    builder = tfds.builder(spec.builder, data_dir=data_dir)
    how_to_prepare = (
        f"Prepare it once where there is network access with `tfds build {spec.builder} "
        "--file_format=array_record --data_dir=DIR` and point data_dir (or the TFDS_DATA_DIR "
        "environment variable) at DIR, or set --config.data.download=True to download and "
        "prepare it here."
    )
    if not builder.is_prepared():
        if not download:
            raise ValueError(
                f"TFDS dataset {spec.builder!r} is not prepared in {str(builder.data_dir)!r} and "
                f"config.data.download is False, so nothing is fetched. {how_to_prepare}"
            )
        builder.download_and_prepare(file_format="array_record")
    file_format = str(builder.info.file_format.value)
    if file_format not in ("array_record", "parquet"):
        raise ValueError(
            f"TFDS dataset {spec.builder!r} in {str(builder.data_dir)!r} is stored as "
            f"{file_format}, which needs TensorFlow to read. {how_to_prepare} (use a new DIR)"
        )
    return builder.as_data_source(split=spec.splits[split])


def _record_ids(record) -> np.ndarray:
    """i32[N + 1]: the byte ids of a TFDS record's text, then eos."""
    return ByteTokenizer().encode(record["text"], add_eos=True)


def _tfds_source(name: str, split: str, *, data_dir: str | None, download: bool):
    records = open_tfds_split(name, split, data_dir=data_dir, download=download)
    description = f"the {split} split of TFDS {name!r}"
    if len(records) == 0:
        raise ValueError(f"{description} has no records.")
    documents = lambda: (_record_ids(records[i]) for i in range(len(records)))
    if TFDS_DATASETS[name].is_stream:
        ids = np.concatenate(list(documents()))
        return StreamSource(tokens=ids.astype(np.uint16), description=description)
    return DocumentSource(
        sample_document=lambda rng: _record_ids(records[int(rng.integers(len(records)))]),
        description=description,
        documents=documents,
    )


def _synthetic_source(seed: int) -> DocumentSource:
    corpus = SyntheticCorpus(seed)

    def sample_document(rng: np.random.Generator) -> np.ndarray:
        _, document = corpus.sample_document(rng)
        return np.append(document.astype(np.int32) + BYTE_OFFSET, EOS_ID).astype(np.int32)

    return DocumentSource(sample_document=sample_document, description="the synthetic corpus")


def make_source(name: str, split: str, *, seed: int, data_dir: str | None, download: bool):
    """The `StreamSource` or `DocumentSource` that `name` (a `data.name`) denotes."""
    kind, _, argument = name.partition(":")
    if name == "synthetic":
        return _synthetic_source(seed)
    if name in BUNDLED_TEXTS:
        return _bundled_text_source(name, split)
    if kind == "text" and argument:
        return _text_file_source(argument, split)
    if name == PYTHON_STDLIB:
        return _python_stdlib_source(split)
    if kind == "tfds" and argument in TFDS_DATASETS:
        return _tfds_source(argument, split, data_dir=data_dir, download=download)
    raise ValueError(f"Unknown data.name {name!r}; valid forms are {NAME_FORMS}.")


def make_dataset(
    data_config,
    *,
    split: str,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    seed: int,
    task: str = "lm",
    process_index: int = 0,
    process_count: int = 1,
) -> Dataset:
    """The `Dataset` of `split` ('train' | 'validation') described by `data_config`.

    Args:
      data_config: `config.data` (name, download, noise_density, mean_noise_span_length,
        inputs_length; an optional data_dir for TFDS).
      batch_size: global rows per step; this process gets batch_size // process_count.
      seq_len: 'lm' row length; for 'span_corruption' the encoder length when
        data_config.inputs_length is 0.
      vocab_size: the model's vocabulary; checked against the token layout.
      seed: the data seed; the validation split draws from a different stream.
      task: 'lm' or 'span_corruption'.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}.")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index}, {process_count}."
        )
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by process_count {process_count}."
        )
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for the byte token layout (3 specials + 256 "
            f"bytes = {MIN_VOCAB_SIZE}); set config.model.vocab_size=384."
        )
    seed = _check_seed(seed)
    source = make_source(
        data_config.name,
        split,
        seed=seed,
        data_dir=data_config.get("data_dir", None) or None,
        download=bool(data_config.download),
    )
    if task == "lm":
        source.check_length(seq_len)
        row_length = seq_len
        features = lambda raw, rng: spans.lm_features(*raw, pad_id=PAD_ID)
    else:
        inputs_length = int(data_config.inputs_length) or seq_len
        density = float(data_config.noise_density)
        mean_span = float(data_config.mean_noise_span_length)
        tokens_length, targets_length = spans.span_corruption_lengths(
            inputs_length, density, mean_span
        )
        _, num_spans = spans.noise_span_counts(tokens_length, density, mean_span)
        if vocab_size - num_spans < MIN_VOCAB_SIZE:
            raise ValueError(
                f"span corruption of {inputs_length}-token inputs uses {num_spans} sentinels "
                f"below vocab_size {vocab_size}, overlapping the byte ids (< {MIN_VOCAB_SIZE});"
                f" set config.model.vocab_size >= {MIN_VOCAB_SIZE + num_spans} (384 has room "
                "for 125 sentinels)."
            )
        source.check_length(tokens_length)
        # A raw chunk of tokens_length tokens corrupts to at most inputs_length encoder tokens.
        row_length = tokens_length
        features = lambda raw, rng: spans.span_corruption_features(
            raw[0][raw[1] > 0],  # the real tokens (only a full pass's last row has padding)
            rng,
            inputs_length=inputs_length,
            targets_length=targets_length,
            vocab_size=vocab_size,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            noise_density=density,
            mean_noise_span_length=mean_span,
        )
    split_code = SPLITS.index(split)
    return Dataset(
        lambda rng: features(source.packed_row(rng, row_length), rng),
        split,
        batch_size,
        seed,
        process_index,
        process_count,
        full_pass_rows=lambda: (
            features(raw, np.random.default_rng([seed, split_code, _FULL_PASS_STREAM, index]))
            for index, raw in enumerate(source.sequential_rows(row_length))
        ),
    )


def dataset_from_config(config, split: str, *, process_index: int = 0, process_count: int = 1):
    """`make_dataset` with the sizes of a full config; the task follows config.model.kind."""
    kind = config.model.kind
    if kind not in KINDS:
        raise ValueError(f"config.model.kind must be one of {KINDS}, got {kind!r}.")
    return make_dataset(
        config.data,
        split=split,
        batch_size=config.train.batch_size,
        seq_len=config.train.seq_len,
        vocab_size=config.model.vocab_size,
        seed=config.seed,
        task="lm" if kind in DECODER_KINDS else "span_corruption",
        process_index=process_index,
        process_count=process_count,
    )

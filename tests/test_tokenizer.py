"""The byte-level BPE ("bpe:N"): lossless round trips (every held-out stdlib file, and files that
are not UTF-8), the separator as its own id, training on the training split only, the saved
tokenizer.json read back identically, spec errors, and the model vocabulary sized from the spec.
No model is compiled here."""

import os
import random

import ml_collections
import numpy as np
import pytest

from dsv3_jax.training import data, run_config
from dsv3_jax.training.tokenizer import (
    CACHE_FILE,
    ByteBPETokenizer,
    bpe_size,
    load_tokenizer,
    run_tokenizer,
    spec_vocab,
)

VOCAB = 600  # small: trains in well under a second on a slice of the training split


def data_config(source="stdlib", **kw):
    return ml_collections.ConfigDict(dict(dict(source=source, tokenizer=f"bpe:{VOCAB}",
                                               heldout_fraction=0.02, heldout_max_tokens=1 << 20,
                                               token_dtype="uint16"), **kw))


@pytest.fixture(scope="module")
def stdlib_documents():
    return data.read_documents(data_config())


@pytest.fixture(scope="module")
def bpe(stdlib_documents):
    train = stdlib_documents.train_texts(0.02)
    return ByteBPETokenizer.train(train[::10], VOCAB)  # every 10th training file: fast


def invalid_utf8_files() -> dict[str, bytes]:
    """Files no UTF-8 decoder accepts, and bytes that spell the separator's name."""
    rng = random.Random(0)
    latin1 = " ".join(rng.choice(["caf\xe9", "na\xefve", "\xfcber", "def", "x = 1\n"])
                      for _ in range(2000)).encode("latin-1")
    files = {
        "latin1.py": latin1,
        "random.dat": bytes(rng.randrange(256) for _ in range(20_000)),
        "every_byte.dat": bytes(range(256)) * 4,
        "truncated_utf8.py": "print('é€😀".encode()[:-2] * 50,  # half an emoji each time
        "lone_continuation.py": b"x = '\x80\xbf'\n\xff\xfe\x00\x00" * 30,
        "separator_name.py": ByteBPETokenizer.SEPARATOR.encode("utf-8") * 3
        + ByteBPETokenizer.SEPARATOR.encode("utf-8", "replace")[:-2],
    }
    for name, raw in files.items():
        if name != "separator_name.py":
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")
    return files


def test_round_trip_every_heldout_file_and_invalid_utf8(bpe, stdlib_documents):
    heldout = [t for t, h in zip(stdlib_documents.texts, stdlib_documents.heldout) if h]
    assert len(heldout) >= 10
    ids = bpe.encode_batch(heldout + list(invalid_utf8_files().values()))
    for raw, got in zip(heldout + list(invalid_utf8_files().values()), ids):
        assert bpe.decode_bytes(got) == raw
        assert (got != bpe.separator_id).all()  # no input spells the separator
        assert ((got >= 0) & (got < bpe.vocab_size)).all()
    # Merges happen: Python source takes well under one token per byte even at 600 ids.
    assert sum(map(len, ids[:len(heldout)])) < 0.6 * sum(map(len, heldout))
    # str input is its UTF-8 bytes.
    assert bpe.decode_bytes(bpe.encode("def café():\n")) == "def café():\n".encode()
    assert bpe.decode(bpe.encode(b"ok \xff")) == "ok \ufffd"  # display only: replacement
    # Ids of the model's padding rows (vocab 600 padded to 640) decode to nothing.
    assert bpe.decode_bytes([*bpe.encode(b"a"), VOCAB, bpe.padded_vocab_size - 1]) == b"a"


def test_corpus_stream_decodes_to_the_files_bytes(bpe, tmp_path):
    files = invalid_utf8_files()
    for i in range(60):
        files[f"doc{i:02d}.py"] = f"def f{i}(x):\n    return x * {i}\n".encode() + bytes([i + 128])
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    config = data_config(str(tmp_path / "*"), heldout_fraction=0.2)
    corpus = data.load_corpus(config, bpe)
    held = sorted(n for n in files if data.is_heldout(n, 0.2))
    assert 0 < len(held) < len(files)
    assert corpus.heldout_text == b"".join(files[n] for n in held)
    assert bpe.decode_bytes(corpus.heldout) == corpus.heldout_text  # separators decode to b""
    # One separator after each document, and nowhere else.
    assert (corpus.heldout == bpe.separator_id).sum() == len(held)
    assert (corpus.train == bpe.separator_id).sum() == len(files) - len(held)
    docs = np.split(corpus.heldout, np.flatnonzero(corpus.heldout == bpe.separator_id) + 1)[:-1]
    assert [bpe.decode_bytes(d) for d in docs] == [files[n] for n in held]
    # A single file: the held-out tail of its tokens, decoded, ends the file's bytes.
    single = data.load_corpus(data_config(str(tmp_path / "random.dat"), heldout_fraction=0.1),
                              bpe)
    assert files["random.dat"].endswith(single.heldout_text)
    assert bpe.decode_bytes(np.concatenate([single.train, single.heldout])) == files["random.dat"]


def test_trains_on_the_training_split_only(stdlib_documents):
    # The files whose path the split keeps for training, read here independently.
    expected = []
    for rel, path in data.stdlib_files():
        if not data.is_heldout(rel, 0.02):
            with open(path, "rb") as f:
                expected.append(f.read())
    train = stdlib_documents.train_texts(0.02)
    assert train == expected and len(train) < len(stdlib_documents.texts)
    # Without a file-level split: the leading bytes, the held-out fraction cut off the end.
    one = data.Documents([b"a" * 900, b"b" * 100], ["x", "y"], [False, False], "two files")
    assert one.train_texts(0.1) == [b"a" * 900]


def test_saved_tokenizer_reads_back_identically(bpe, stdlib_documents, tmp_path):
    bpe.save(str(tmp_path / CACHE_FILE))
    loaded = load_tokenizer(f"bpe:{VOCAB}", str(tmp_path))
    by_path = load_tokenizer(str(tmp_path / CACHE_FILE))  # a path to it: the same BPE
    assert isinstance(by_path, ByteBPETokenizer) and by_path.reads_bytes
    sample = stdlib_documents.texts[:20] + list(invalid_utf8_files().values())
    for a, b, c in zip(bpe.encode_batch(sample), loaded.encode_batch(sample),
                       by_path.encode_batch(sample)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert (loaded.vocab_size, loaded.separator_id) == (bpe.vocab_size, bpe.separator_id)
    # train.py's start: the cached one, not a new one (the documents are never asked for).
    cached, trained = run_tokenizer(f"bpe:{VOCAB}", str(tmp_path), train_documents=None)
    assert not trained and cached.vocab_size == VOCAB
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(f"bpe:{VOCAB}", str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="holds checkpoints"):
        run_tokenizer(f"bpe:{VOCAB}", str(tmp_path / "elsewhere"), None, resuming=True)


def test_training_is_deterministic_and_sized(stdlib_documents):
    train = stdlib_documents.train_texts(0.02)[::25]
    a = ByteBPETokenizer.train(train, 400)
    b = ByteBPETokenizer.train(train, 400)
    assert a.vocab_size == 400 and a.padded_vocab_size == 512
    text = stdlib_documents.texts[0]
    np.testing.assert_array_equal(a.encode(text), b.encode(text))
    # 257 ids: the 256 bytes and the separator, no merges: one token per byte.
    plain = ByteBPETokenizer.train(train, 257)
    assert plain.vocab_size == 257 and len(plain.encode(text)) == len(text)
    # A tiny corpus runs out of merges before N: fewer ids than asked, never more.
    small = ByteBPETokenizer.train([b"abab"], 1000)
    assert 258 <= small.vocab_size < 1000
    assert small.decode_bytes(small.encode(b"abab\xff")) == b"abab\xff"


@pytest.mark.parametrize("spec", ["bpe:0", "bpe:abc", "bpe:256", "bpe:", "bpe:-4", "bpe:4k",
                                  "bpe:²"])
def test_bad_spec_names_what_is_allowed(spec):
    with pytest.raises(ValueError) as e:
        bpe_size(spec)
    message = str(e.value)
    assert f"data.tokenizer={spec!r} is invalid" in message and "'bpe:N'" in message
    assert "N >= 257" in message and "\n" not in message


def test_model_vocab_sized_from_the_spec():
    config = run_config.base_config("tiny")
    config.model.vocab_size = 0  # from the tokenizer
    config.data.tokenizer = "bpe:4000"
    assert spec_vocab("bpe:4000").vocab_size == 4000
    assert run_config.model_config(config).vocab_size == 4096  # padded to a multiple of 128
    config.data.tokenizer = "byte"
    assert run_config.model_config(config).vocab_size == 384
    config.data.tokenizer = "bpe:12x"
    with pytest.raises(run_config.ConfigError, match="'bpe:12x' is invalid"):
        run_config.model_config(config)
    config.data.tokenizer, config.data.source = "bpe:4000", "tokens.npy"
    with pytest.raises(run_config.ConfigError, match="token file"):
        run_config.check_run(config)


def test_workdir_keeps_its_tokenizer(tmp_path):
    config = run_config.base_config("tiny")
    saved = ml_collections.ConfigDict(config.to_dict())
    config.data.tokenizer = "bpe:1000"
    with pytest.raises(run_config.ConfigError, match="data.tokenizer='byte', not 'bpe:1000'"):
        run_config.check_same_tokenizer(config, str(tmp_path), saved)
    saved.data.tokenizer = "bpe:1000"
    run_config.check_same_tokenizer(config, str(tmp_path), saved)
    saved.data.source = os.path.join(str(tmp_path), "*.txt")  # the cached BPE's training data
    with pytest.raises(run_config.ConfigError, match="data.source="):
        run_config.check_same_tokenizer(config, str(tmp_path), saved)
    run_config.check_same_tokenizer(config, str(tmp_path), None)  # a fresh workdir

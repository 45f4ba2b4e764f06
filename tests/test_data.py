"""Data: sources, the stable train/held-out split, tokenizers, the grain pipeline (determinism,
per-process sharding, resumable iterator state), evaluation windows, the xz reference.
No model is compiled here."""

import hashlib
import lzma
import math
import os
import random

import ml_collections
import numpy as np
import pytest

from dsv3_jax.training import data
from dsv3_jax.training.tokenizer import ByteTokenizer, NotUTF8Error, load_tokenizer, padded


def data_config(source, **kw):
    return ml_collections.ConfigDict(dict(dict(source=source, tokenizer="byte",
                                               heldout_fraction=0.02, heldout_max_tokens=1 << 20,
                                               token_dtype="uint16"), **kw))


# ---- split --------------------------------------------------------------------------------

def test_is_heldout_is_sha256_of_the_path():
    # Worked by hand: SHA-256("json/decoder.py") starts with these 8 bytes; as a fraction of
    # 2^64 it is the value below, so the file is held out exactly when fraction exceeds it.
    digest = hashlib.sha256(b"json/decoder.py").digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    assert data.is_heldout("json/decoder.py", min(1.0, position + 1e-9))
    assert not data.is_heldout("json/decoder.py", max(0.0, position - 1e-9))
    # The OS separator does not change the decision.
    assert data.is_heldout(os.path.join("json", "decoder.py"), 0.5) == \
        data.is_heldout("json/decoder.py", 0.5)


def test_heldout_split_is_stable_and_monotone():
    paths = [f"pkg{i}/mod{j}.py" for i in range(20) for j in range(50)]
    small = {p for p in paths if data.is_heldout(p, 0.02)}
    large = {p for p in paths if data.is_heldout(p, 0.10)}
    assert small <= large  # growing the held-out fraction never moves a file back to train
    assert 0.01 < len(small) / len(paths) < 0.04 and 0.07 < len(large) / len(paths) < 0.14
    shuffled = random.Random(0).sample(paths, len(paths))  # the order of discovery is irrelevant
    assert {p for p in shuffled if data.is_heldout(p, 0.02)} == small


def test_stdlib_corpus_excludes_tests_and_site_packages():
    files = data.stdlib_files()
    assert len(files) > 300
    for rel, path in files:
        parts = rel.split(os.sep)
        assert not {"test", "tests", "idle_test"} & set(parts[:-1]), rel
        assert parts[0] not in ("site-packages", "dist-packages"), rel
        assert rel.endswith(".py") and os.path.isfile(path)
    assert [r for r, _ in files] == sorted(r for r, _ in files)


def test_stdlib_corpus_split_and_bytes():
    corpus = data.load_corpus(data_config("stdlib"), ByteTokenizer())
    heldout = [rel for rel, _ in data.stdlib_files() if data.is_heldout(rel, 0.02)]
    assert heldout, "the 2% split of the stdlib holds out some files"
    # Byte tokens: the held-out stream is its files' bytes plus one separator per file.
    assert len(corpus.heldout) == corpus.heldout_bytes + len(heldout)
    assert (corpus.heldout == 256).sum() == len(heldout)
    again = data.load_corpus(data_config("stdlib"), ByteTokenizer())
    np.testing.assert_array_equal(corpus.heldout, again.heldout)
    assert len(corpus.train) > 50 * len(corpus.heldout)


def test_glob_source_splits_by_file_and_falls_back_to_tail(tmp_path):
    for i in range(200):
        (tmp_path / f"doc{i:03d}.txt").write_text(f"document {i}\n" * 3)
    corpus = data.load_corpus(data_config(str(tmp_path / "*.txt")), ByteTokenizer())
    held = [f"doc{i:03d}.txt" for i in range(200) if data.is_heldout(f"doc{i:03d}.txt", 0.02)]
    assert corpus.heldout_text == b"".join((tmp_path / h).read_bytes() for h in held)
    # One file cannot be split by path: the tail of its tokens is held out instead.
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "only.txt").write_text("x" * 1000)
    single = data.load_corpus(data_config(str(tmp_path / "one" / "*.txt")), ByteTokenizer())
    assert len(single.heldout) == 20 and len(single.train) == 1001 - 20
    with pytest.raises(ValueError, match="matches no files"):
        data.load_corpus(data_config(str(tmp_path / "*.nothing")), ByteTokenizer())


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_file_source(tmp_path, suffix):
    tokens = (np.arange(5000) % 200).astype(np.uint16)
    path = str(tmp_path / f"tokens{suffix}")
    np.save(path, tokens) if suffix == ".npy" else tokens.tofile(path)
    corpus = data.load_corpus(data_config(path), ByteTokenizer())
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.heldout]), tokens)
    assert len(corpus.heldout) == 100
    bad = str(tmp_path / f"bad{suffix}")
    big = np.full(10, 300, np.uint16)  # id 300: beyond the byte tokenizer's 257 ids
    np.save(bad, big) if suffix == ".npy" else big.tofile(bad)
    with pytest.raises(ValueError, match="token id 300"):
        data.load_corpus(data_config(bad), ByteTokenizer())


# ---- non-UTF-8 text: bits/byte and xz count the files' original bytes ---------------------

def latin1_bytes(n: int, seed: int = 0) -> bytes:
    """n bytes of Latin-1 text with accented letters (bytes > 0x7F), not valid UTF-8."""
    rng = random.Random(seed)
    words = ["caf\xe9", "na\xefve", "gar\xe7on", "\xfcber", "se\xf1or", "def", "return", "x"]
    text = " ".join(rng.choice(words) for _ in range(n)).encode("latin-1")[:n]
    with pytest.raises(UnicodeDecodeError):
        text.decode("utf-8")
    return text


def xz_of(raw: bytes) -> float:  # the preset data.xz_bits_per_byte documents (xz -9e)
    return 8.0 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) / len(raw)


def test_latin1_file_byte_tokenizer_reads_raw_bytes(tmp_path):
    raw = latin1_bytes(20_000)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "latin1.txt").write_bytes(raw)
    corpus = data.load_corpus(data_config(str(tmp_path / "one" / "*.txt"),
                                          heldout_fraction=0.1), ByteTokenizer())
    # Tail split of one file: the tokens are the file's bytes, then one separator.
    stream = np.concatenate([corpus.train, corpus.heldout])
    assert stream[-1] == 256 and (stream == 256).sum() == 1
    assert stream[:-1].astype(np.uint8).tobytes() == raw
    assert len(stream) - 1 == os.path.getsize(tmp_path / "one" / "latin1.txt")  # 1 token/byte
    tail = raw[len(corpus.train):]
    assert corpus.heldout_text == tail and corpus.heldout_bytes == len(tail)
    assert corpus.heldout_tokens_per_byte == (len(tail) + 1) / len(tail)  # + the separator
    assert data.xz_bits_per_byte(corpus.heldout_text) == xz_of(tail)
    # File-level split: the held-out files' bytes, unchanged.
    for i in range(100):
        (tmp_path / f"doc{i:03d}.txt").write_bytes(latin1_bytes(300, seed=i))
    split = data.load_corpus(data_config(str(tmp_path / "*.txt"), heldout_fraction=0.1),
                             ByteTokenizer())
    held = [f"doc{i:03d}.txt" for i in range(100) if data.is_heldout(f"doc{i:03d}.txt", 0.1)]
    assert 0 < len(held) < 100
    held_raw = b"".join((tmp_path / h).read_bytes() for h in held)
    assert split.heldout_text == held_raw and split.heldout_bytes == 300 * len(held)
    assert split.heldout[split.heldout < 256].astype(np.uint8).tobytes() == held_raw
    assert data.xz_bits_per_byte(split.heldout_text) == xz_of(held_raw)
    # Pre-tokenized byte ids: the held-out bytes are the ids themselves.
    path = str(tmp_path / "latin1.npy")
    np.save(path, np.frombuffer(raw, np.uint8).astype(np.uint16))
    tokens = data.load_corpus(data_config(path, heldout_fraction=0.1), ByteTokenizer())
    assert tokens.heldout_text == raw[-len(tokens.heldout):] == tokens.heldout_text


def test_heldout_bits_per_byte_by_hand(tmp_path):
    # 1000 Latin-1 bytes, held-out fraction 0.1: the stream is 1000 bytes + 1 separator = 1001
    # tokens, the last int(100.1) = 100 held out: bytes 901..999 (99 bytes) and the separator.
    raw = latin1_bytes(1000, seed=3)
    assert max(raw[901:]) > 0x7F  # the held-out tail has non-ASCII bytes (the old bug's case)
    (tmp_path / "f.txt").write_bytes(raw)
    corpus = data.load_corpus(data_config(str(tmp_path / "f.txt"), heldout_fraction=0.1),
                              ByteTokenizer())
    assert corpus.heldout_bytes == 99 and corpus.heldout_text == raw[901:]
    assert len(corpus.heldout) == 100
    # A uniform model over the 257 ids: ln 257 nats on every predicted token. train.py's
    # evaluate(): mean nats per token / ln 2 × held-out tokens per byte.
    nats = count = 0.0
    for _, mask in data.eval_batches(corpus.heldout, seq_len=16, batch_size=2):
        nats, count = nats + mask.sum() * math.log(257), count + mask.sum()
    assert count == 99  # every held-out token but the first is predicted
    loss = nats / count
    bits_per_byte = loss / math.log(2) * corpus.heldout_tokens_per_byte
    # By hand: that mean over all 100 held-out tokens, in bits, over the 99 original bytes.
    assert bits_per_byte == pytest.approx(100 * math.log2(257) / 99, rel=1e-12)
    assert bits_per_byte == pytest.approx(loss * len(corpus.heldout) / math.log(2) / 99,
                                          rel=1e-12)


def word_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<|endoftext|>": 1, "caf\xe9": 2, "w": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    return load_tokenizer(path)


def test_text_tokenizer_rejects_non_utf8_naming_the_file(tmp_path):
    tok = word_tokenizer(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("caf\xe9 w w\n", encoding="utf-8")
    ok = data.load_corpus(data_config(str(tmp_path / "docs" / "*.txt")), tok)
    np.testing.assert_array_equal(np.concatenate([ok.train, ok.heldout]), [2, 3, 3, 1])
    bad = tmp_path / "docs" / "b_latin1.txt"
    bad.write_bytes("w caf\xe9 w\n".encode("latin-1"))
    with pytest.raises(NotUTF8Error) as e:
        data.load_corpus(data_config(str(tmp_path / "docs" / "*.txt")), tok)
    assert isinstance(e.value, ValueError)  # train.py: one-line error, exit status 2
    message = str(e.value)
    assert str(bad) in message and "UTF-8" in message and "'byte'" in message
    assert "0xe9 at offset 5" in message and "\n" not in message
    with pytest.raises(NotUTF8Error, match="UTF-8"):
        tok.encode(bad.read_bytes())
    # The byte tokenizer takes the same files as they are.
    corpus = data.load_corpus(data_config(str(tmp_path / "docs" / "*.txt")), ByteTokenizer())
    assert (bad.read_bytes() in np.concatenate([corpus.train, corpus.heldout])
            .astype(np.uint8).tobytes())


# ---- tokenizers ---------------------------------------------------------------------------

def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.padded_vocab_size == 384 == padded(257)
    text = "def f(x):\n    return 'é'\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and ids.max() < 256
    assert tok.decode(np.append(ids, tok.separator_id)) == text
    raw = "caf\xe9".encode("latin-1")  # raw bytes in, the same bytes out, no decoding
    np.testing.assert_array_equal(tok.encode(raw), list(raw))
    assert tok.decode_bytes(np.append(tok.encode(raw), tok.separator_id)) == raw


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{f"w{i}": i + 2 for i in range(500)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    loaded = load_tokenizer(path)
    assert loaded.vocab_size == 502 and loaded.padded_vocab_size == 512
    assert loaded.separator_id == 1
    np.testing.assert_array_equal(loaded.encode("w3 w10 w499"), [5, 12, 501])
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path / "missing.json"))


# ---- training pipeline --------------------------------------------------------------------

def batches(ds, n, state=None):
    it = data.train_iterator(ds)
    if state is not None:
        it.set_state(state)
    return [next(it) for _ in range(n)], it


def test_windows_are_packed_slices_and_epochs_reshuffle():
    tokens = np.arange(10 * 9, dtype=np.int32)  # 10 windows of seq_len + 1 = 9
    ds = data.train_dataset(tokens, seq_len=8, global_batch=5, seed=3)
    got, _ = batches(ds, 4)  # two epochs
    for b in got:
        assert b.shape == (5, 9) and b.dtype == np.int32
        np.testing.assert_array_equal(b[:, 1:] - b[:, :-1], 1)  # contiguous windows
        assert (b[:, 0] % 9 == 0).all()
    epoch1 = sorted(np.concatenate(got[:2])[:, 0] // 9)
    epoch2 = sorted(np.concatenate(got[2:])[:, 0] // 9)
    assert epoch1 == epoch2 == list(range(10))  # every window exactly once per epoch
    assert not np.array_equal(np.concatenate(got[:2]), np.concatenate(got[2:]))


def test_pipeline_is_deterministic_per_seed():
    tokens = np.arange(100_000, dtype=np.int32) % 251
    a, _ = batches(data.train_dataset(tokens, seq_len=16, global_batch=4, seed=0), 5)
    b, _ = batches(data.train_dataset(tokens, seq_len=16, global_batch=4, seed=0), 5)
    c, _ = batches(data.train_dataset(tokens, seq_len=16, global_batch=4, seed=1), 5)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))


def test_per_process_shards_reassemble_the_global_batch():
    tokens = np.arange(50_000, dtype=np.int32)
    full, _ = batches(data.train_dataset(tokens, seq_len=16, global_batch=8, seed=7), 3)
    parts = [batches(data.train_dataset(tokens, seq_len=16, global_batch=8, seed=7,
                                        process_index=p, process_count=4), 3)[0]
             for p in range(4)]
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate([parts[p][i] for p in range(4)]), full[i])
    with pytest.raises(ValueError, match="divisible"):
        data.train_dataset(tokens, seq_len=16, global_batch=6, seed=0, process_count=4)


def test_iterator_state_resumes_exactly():
    tokens = np.arange(50_000, dtype=np.int32)
    ds = data.train_dataset(tokens, seq_len=16, global_batch=4, seed=0)
    reference, _ = batches(ds, 8)
    _, it = batches(ds, 5)
    state = it.get_state()
    resumed, _ = batches(ds, 3, state=state)
    np.testing.assert_array_equal(np.stack(resumed), np.stack(reference[5:]))


def test_eval_windows_predict_every_token_once():
    tokens = np.arange(1000, dtype=np.int32)
    got = list(data.eval_batches(tokens, seq_len=64, batch_size=4))
    assert all(x.shape == (4, 65) and m.shape == (4, 64) for x, m in got)
    targets = np.concatenate([x[:, 1:][m > 0] for x, m in got])
    np.testing.assert_array_equal(targets, tokens[1:])  # each target once, in order
    assert len(list(data.eval_batches(tokens, seq_len=64, batch_size=4, max_batches=2))) == 2


def test_xz_reference():
    repetitive = b"def f(x):\n    return x\n" * 2000
    noise = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    assert data.xz_bits_per_byte(repetitive) < 0.1
    assert data.xz_bits_per_byte(noise) > 7.9

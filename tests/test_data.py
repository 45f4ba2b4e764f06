"""Data: sources, the stable train/held-out split, tokenizers, the grain pipeline (determinism,
per-process sharding, resumable iterator state), evaluation windows, the xz reference.
No model is compiled here."""

import hashlib
import os
import random

import ml_collections
import numpy as np
import pytest

from dsv3_jax.training import data
from dsv3_jax.training.tokenizer import ByteTokenizer, load_tokenizer, padded


def data_config(source, **kw):
    return ml_collections.ConfigDict(dict(source=source, tokenizer="byte", heldout_fraction=0.02,
                                          heldout_max_tokens=1 << 20, token_dtype="uint16",
                                          **kw))


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


# ---- tokenizers ---------------------------------------------------------------------------

def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.padded_vocab_size == 384 == padded(257)
    text = "def f(x):\n    return 'é'\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and ids.max() < 256
    assert tok.decode(np.append(ids, tok.separator_id)) == text


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

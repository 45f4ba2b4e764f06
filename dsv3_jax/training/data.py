"""Training data: corpora, the train/held-out split, the grain pipeline, evaluation windows.

Sources (`data.source`):
  * "stdlib" (default): the running interpreter's standard-library `.py` files, test packages
    and site-packages excluded — real text on every machine, no download;
  * a path ending in `.npy` or `.bin`: pre-tokenized ids (memory-mapped; `.bin` has
    `data.token_dtype`), the last `heldout_fraction` of it held out;
  * anything else: a glob of text files (`**` allowed).
Files go to train or held-out by a stable hash of their relative path (SHA-256, not Python's
salted `hash`), so adding a file never moves another one across the split. Documents are joined
into one token stream with the tokenizer's separator after each.

Bits per byte count the files' original bytes, whatever their encoding: the byte tokenizer's ids
are the raw bytes, and the byte-level BPE ("bpe:N", trained on `Documents.train_texts`) decodes
to exactly them (a Latin-1 file is as good as a UTF-8 one, and the xz reference sees exactly
the held-out files' bytes); a text tokenizer (tokenizer.json) rejects a file that is not valid
UTF-8 with a one-line error naming it (tokenizer.NotUTF8Error, a ValueError), as decoding it with
replacement characters would measure bits per byte on other bytes than the file's.

Training windows are `seq_len + 1` consecutive tokens (inputs and shifted targets), cut at a
fixed stride from the train stream, visited in a seeded order that is reshuffled every epoch.
Each process reads only its own rows of every global batch; the iterator's state (one integer)
is checkpointed with the model, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import lzma
import os
import sysconfig
from collections.abc import Iterator

import grain
import numpy as np

from dsv3_jax.training.tokenizer import decode_utf8

_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_TOKEN_SUFFIXES = (".npy", ".bin")


@dataclasses.dataclass
class Corpus:
    """Token streams of both splits, and the held-out text the bits/byte figures refer to."""

    train: np.ndarray  # [N_train] token ids (documents joined with separators)
    heldout: np.ndarray  # [N_heldout]
    heldout_bytes: int  # bytes of the held-out text as stored (the denominator of bits/byte)
    heldout_text: bytes  # the held-out text's original bytes (what the xz reference compresses)
    description: str

    @property
    def heldout_tokens_per_byte(self) -> float:
        return len(self.heldout) / max(self.heldout_bytes, 1)


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, absolute path) of the stdlib's non-test `.py` files, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        if parts and (parts[0] in ("site-packages", "dist-packages")
                      or _TEST_DIRS.intersection(parts) or "__pycache__" in parts):
            dirnames[:] = []
            continue
        for name in filenames:
            if name.endswith(".py"):
                out.append((os.path.join(*parts, name), os.path.join(dirpath, name)))
    return sorted(out)


def glob_files(pattern: str) -> list[tuple[str, str]]:
    """(path relative to the pattern's fixed prefix, absolute path) of the files matched."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    prefix = pattern.split("*")[0].split("?")[0].split("[")[0]
    base = prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)
    return [(os.path.relpath(p, base or "."), os.path.abspath(p)) for p in paths]


def is_heldout(relative_path: str, fraction: float) -> bool:
    """Stable split: the first 8 bytes of SHA-256(path) as a fraction of 2^64."""
    digest = hashlib.sha256(relative_path.replace(os.sep, "/").encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def _decode_bytes(tokenizer, ids) -> bytes:
    """The bytes `ids` stand for: the raw bytes for the byte tokenizer, UTF-8 for text ones."""
    if hasattr(tokenizer, "decode_bytes"):
        return tokenizer.decode_bytes(ids)
    return tokenizer.decode(ids).encode("utf-8")


def _join(docs: list[np.ndarray], separator: int, dtype) -> np.ndarray:
    sep = np.array([separator], dtype)
    return np.concatenate([x for d in docs for x in (d.astype(dtype), sep)] or [sep[:0]])


def stream_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32


@dataclasses.dataclass
class Documents:
    """A text source's files as read: raw bytes, and which ones the path-hash split holds out."""

    texts: list[bytes]
    paths: list[str]  # absolute, for error messages
    heldout: list[bool]
    what: str

    @property
    def split_by_file(self) -> bool:
        """Whether the files split into both sides (else the stream's tail is held out)."""
        return 0 < sum(self.heldout) < len(self.texts)

    def train_texts(self, heldout_fraction: float) -> list[bytes]:
        """The training split's bytes, for training a tokenizer on. Without a file-level split,
        the leading 1 - heldout_fraction of the bytes (the held-out tail is cut in tokens, so
        the two splits meet only approximately there)."""
        if self.split_by_file:
            return [t for t, h in zip(self.texts, self.heldout) if not h]
        joined = b"".join(self.texts)
        return [joined[:len(joined) - max(1, int(len(joined) * heldout_fraction))]]


def read_documents(data) -> Documents | None:
    """The files of a text `data.source` ("stdlib" or a glob); None for a token file. Raises
    ValueError when the glob matches nothing."""
    source = data.source
    if source.endswith(_TOKEN_SUFFIXES):
        return None
    if source == "stdlib":
        files, what = stdlib_files(), "the Python standard library's .py files"
    else:
        files, what = glob_files(source), f"files matching {source!r}"
    if not files:
        raise ValueError(f"data.source={source!r} matches no files")
    texts = []
    for _, path in files:
        with open(path, "rb") as f:
            texts.append(f.read())
    return Documents(texts, [path for _, path in files],
                     [is_heldout(rel, data.heldout_fraction) for rel, _ in files], what)


def load_corpus(data, tokenizer, documents: Documents | None = None) -> Corpus:
    """Reads (unless `documents` are given: `read_documents(data)`) and tokenizes `data.source`.

    Raises ValueError when it matches nothing, and NotUTF8Error (a ValueError naming the file)
    when a text tokenizer is given a file that is not valid UTF-8.
    """
    documents = documents or read_documents(data)
    if documents is None:
        return _token_file_corpus(data, tokenizer)
    texts, heldout_mask = documents.texts, documents.heldout
    if getattr(tokenizer, "reads_bytes", False):  # the byte tokenizer and the byte-level BPE
        strs = texts
    else:
        name = getattr(tokenizer, "name", "text")
        strs = [decode_utf8(t, path, name) for t, path in zip(texts, documents.paths)]
    if hasattr(tokenizer, "encode_batch"):
        docs = tokenizer.encode_batch(strs)
    else:
        docs = [tokenizer.encode(t) for t in strs]
    dtype = stream_dtype(tokenizer.vocab_size)
    sep = tokenizer.separator_id
    if documents.split_by_file:
        train = _join([d for d, h in zip(docs, heldout_mask) if not h], sep, dtype)
        heldout = _join([d for d, h in zip(docs, heldout_mask) if h], sep, dtype)
        heldout_text = b"".join(t for t, h in zip(texts, heldout_mask) if h)
        split = f"{sum(heldout_mask)} of {len(texts)} files held out by path hash"
    else:  # too few files for a file-level split: hold out the tail of the stream instead
        stream = _join(docs, sep, dtype)
        cut = len(stream) - max(1, int(len(stream) * data.heldout_fraction))
        train, heldout = stream[:cut], stream[cut:]
        heldout_text = _decode_bytes(tokenizer, heldout)  # byte tokenizer: the file's tail
        split = f"{len(texts)} files, last {len(heldout)} tokens held out"
    return Corpus(train, heldout, len(heldout_text), heldout_text,
                  f"{documents.what} ({sum(len(t) for t in texts) / 1e6:.1f} MB; {split})")


def _token_file_corpus(data, tokenizer) -> Corpus:
    path = data.source
    if not os.path.isfile(path):
        raise ValueError(f"data.source={path!r}: no such token file")
    if path.endswith(".npy"):
        tokens = np.load(path, mmap_mode="r")
    else:
        tokens = np.memmap(path, dtype=np.dtype(data.token_dtype), mode="r")
    if tokens.ndim != 1 or tokens.size < 2:
        raise ValueError(f"data.source={path!r}: expected a 1-D array of token ids, got shape "
                         f"{tokens.shape}")
    n_heldout = min(max(1, int(tokens.size * data.heldout_fraction)), data.heldout_max_tokens)
    train, heldout = tokens[:-n_heldout], np.asarray(tokens[-n_heldout:])
    top = int(max(train.max(), heldout.max()))
    if top >= tokenizer.vocab_size:
        raise ValueError(f"data.source={path!r} holds token id {top}, beyond data.tokenizer "
                         f"{tokenizer.name!r} (vocab {tokenizer.vocab_size})")
    heldout_text = _decode_bytes(tokenizer, heldout)
    return Corpus(train, heldout, len(heldout_text), heldout_text,
                  f"token file {path} ({tokens.size} tokens; last {n_heldout} held out)")


# ---- training pipeline ---------------------------------------------------------------------

def window_order(num_windows: int, seed: int) -> grain.MapDataset:
    """Global window order: a seeded permutation, reshuffled each epoch, repeated forever."""
    return grain.MapDataset.range(num_windows).shuffle(seed=seed % 2**32).repeat()


def train_dataset(tokens: np.ndarray, *, seq_len: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Batches [global_batch // process_count, seq_len + 1] int32 of this process's rows.

    Row r of global batch i is window order[i·global_batch + r]; process p holds rows
    [p·L, (p+1)·L) with L = global_batch // process_count, so the global batch does not depend
    on how many processes read it.
    """
    window = seq_len + 1
    num_windows = len(tokens) // window
    if num_windows < 1:
        raise ValueError(f"the training split has {len(tokens)} tokens, fewer than one window of "
                         f"seq_len + 1 = {window}")
    if global_batch % process_count:
        raise ValueError(f"batch_size={global_batch} must be divisible by the number of "
                         f"processes ({process_count})")
    local = global_batch // process_count
    order = window_order(num_windows, seed)

    def read(j: int) -> np.ndarray:
        g = (j // local) * global_batch + process_index * local + j % local
        start = order[g] * window
        return np.asarray(tokens[start:start + window], np.int32)

    # 2^40 rows: unbounded in practice, and every global index stays far inside int64.
    return grain.MapDataset.range(2**40).map(read).batch(local, drop_remainder=True)


def train_iterator(ds: grain.MapDataset) -> grain.DatasetIterator:
    # One reader thread with a short prefetch: reading a window is a memory copy.
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


# ---- evaluation ----------------------------------------------------------------------------

def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int,
                 max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Held-out windows at stride `seq_len`, so each token after the first is predicted once.

    Yields (tokens [B, seq_len + 1] int32, mask [B, seq_len] float32); the last window and the
    last batch are zero-padded with mask 0, so every batch has the same shape (one compile).
    """
    n_windows = -(-(len(tokens) - 1) // seq_len)
    n_batches = -(-n_windows // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        x = np.zeros((batch_size, seq_len + 1), np.int32)
        mask = np.zeros((batch_size, seq_len), np.float32)
        for r in range(batch_size):
            start = (b * batch_size + r) * seq_len
            row = np.asarray(tokens[start:start + seq_len + 1], np.int32)
            if len(row) < 2:
                break
            x[r, :len(row)] = row
            mask[r, :len(row) - 1] = 1.0
        yield x, mask


def xz_bits_per_byte(data: bytes) -> float:
    """What `xz -9e` achieves on `data`: compressed bits per input byte."""
    if not data:
        return float("nan")
    compressed = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    return 8.0 * len(compressed) / len(data)

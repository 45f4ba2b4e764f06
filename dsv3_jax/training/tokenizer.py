"""Tokenizers for training: bytes, a byte-level BPE trained on the training split, and a Hugging
Face `tokenizer.json`.

`data.tokenizer` spells which: "byte" (ids 0-255 are the bytes, 256 the separator), "bpe:N" (a
byte-level BPE of N ids that train.py trains on the training split at start and caches as
WORKDIR/tokenizer.json, so a resumed run reuses the identical one), or the path of a
tokenizer.json. `spec_vocab(spec)` says how many ids a spec can emit before any BPE is trained,
so the model's vocabulary is sized and checked before anything is compiled or written.

All expose the same small interface: `encode(text) -> np.ndarray[int32]`, `decode(ids) -> str`,
`decode_bytes(ids) -> bytes` (the bytes the ids stand for: what bits/byte and the xz reference
count), `reads_bytes` (whether `encode` takes a file's raw bytes as they are), `vocab_size` (ids
the tokenizer can emit), `separator_id` (the document separator packed between documents), and
`padded_vocab_size` (vocab rounded up to a multiple of 128: what a model needs).

Encodings: the byte tokenizer and the byte-level BPE never decode, so any file works: the
byte-level BPE sees byte b as the character chr(b) (the bytes' Latin-1 reading), with no
normalizer, and all 256 single-byte tokens are in its vocabulary, so encode → decode_bytes gives
back the exact bytes of every input, invalid UTF-8 included. A text tokenizer (tokenizer.json)
needs text: files that are not valid UTF-8 are rejected with `NotUTF8Error` naming the file
(rather than decoded with replacement characters, which would change the bytes the bits/byte
figure and the xz reference are measured on).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

VOCAB_MULTIPLE = 128


class NotUTF8Error(ValueError):
    """A text file given to a text tokenizer is not valid UTF-8 (a one-line message naming it)."""


def decode_utf8(data: bytes, source: str, tokenizer_name: str) -> str:
    """`data` decoded as strict UTF-8; NotUTF8Error naming `source` when it is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotUTF8Error(
            f"{source} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}): "
            f"the text tokenizer {tokenizer_name!r} needs UTF-8 text; re-encode the file "
            "(e.g. iconv -f latin1 -t utf-8) or use data.tokenizer='byte', which reads raw "
            "bytes") from None


def padded(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-vocab_size // multiple) * multiple


class ByteTokenizer:
    """Bytes are ids 0-255; id 256 separates documents. 257 ids, padded to 384.

    Files are read as raw bytes, whatever their encoding (str input is encoded as UTF-8).
    """

    name = "byte"
    vocab_size = 257
    separator_id = 256
    reads_bytes = True

    @property
    def padded_vocab_size(self) -> int:
        return padded(self.vocab_size)

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode_bytes(self, ids) -> bytes:
        """The bytes the ids stand for (separators dropped): exactly the input's bytes."""
        ids = np.asarray(ids).reshape(-1)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        """For display: decode_bytes as UTF-8, invalid bytes shown as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer.json. The separator is its end-of-text token if it has one.

    A text tokenizer: bytes given to `encode` must be UTF-8 (NotUTF8Error otherwise, see the
    module docstring); `decode_bytes` is the UTF-8 encoding of the decoded text.
    """

    reads_bytes = False

    _SEPARATORS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]",
                   "<｜end▁of▁sentence｜>")

    def __init__(self, path: str):
        import tokenizers  # imported here: only needed for this tokenizer

        self.name = os.path.abspath(path)
        self._tok = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        found = [vocab[s] for s in self._SEPARATORS if s in vocab]
        # Without an end-of-text token, documents are separated by a newline's first token.
        self.separator_id = found[0] if found else int(self._tok.encode("\n").ids[0])

    @property
    def padded_vocab_size(self) -> int:
        return padded(self.vocab_size)

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = decode_utf8(text, "the input", self.name)
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in out]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                skip_special_tokens=False)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")


class ByteBPETokenizer:
    """A byte-level BPE over the `tokenizers` library: lossless for any bytes.

    Byte b enters the library as the character chr(b) (`bytes.decode("latin-1")`), so the
    library never decodes anything; GPT-2's pre-tokenization pattern splits that text into
    words (it keeps every character: nothing is dropped) and BPE merges within them. The
    vocabulary holds all 256 single-byte tokens, so there is no unknown token, and
    `decode_bytes` joins the tokens' bytes. The separator is its own id, a special token whose
    name has characters beyond U+00FF, so no input's bytes can spell it.
    """

    reads_bytes = True
    SEPARATOR = "<|end\u2581of\u2581document|>"
    MIN_VOCAB = 257  # the 256 bytes and the separator: a BPE with no merges
    # GPT-2's pattern: contractions, letters, digits, other symbols (each after an optional
    # space), and runs of whitespace that leave their last space to the next word.
    PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, tok, name: str):
        self._tok = tok
        self.name = name
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.separator_id = tok.token_to_id(self.SEPARATOR)
        self._bytes = [b"" if i == self.separator_id else tok.id_to_token(i).encode("latin-1")
                       for i in range(self.vocab_size)]

    @classmethod
    def train(cls, documents, vocab_size: int, name: str | None = None) -> ByteBPETokenizer:
        """Trained on `documents` (an iterable of bytes) to at most `vocab_size` ids (fewer when
        the documents run out of pairs to merge)."""
        import tokenizers  # imported here: only needed for the BPE and tokenizer.json

        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(
            tokenizers.Regex(cls.PATTERN), behavior="isolated")
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[cls.SEPARATOR], show_progress=False,
            initial_alphabet=[chr(b) for b in range(256)], limit_alphabet=256)
        tok.train_from_iterator((d.decode("latin-1") for d in documents), trainer)
        return cls(tok, name or f"bpe:{vocab_size}")

    @classmethod
    def is_one(cls, tok) -> bool:
        """Whether a loaded `tokenizers.Tokenizer` is one of ours (its separator names it)."""
        return tok.token_to_id(cls.SEPARATOR) is not None and tok.normalizer is None

    def save(self, path: str) -> None:
        self._tok.save(path + ".tmp")
        os.replace(path + ".tmp", path)

    @property
    def padded_vocab_size(self) -> int:
        return padded(self.vocab_size)

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return self.encode_batch([data])[0]

    def encode_batch(self, texts: list[bytes]) -> list[np.ndarray]:
        out = self._tok.encode_batch([t.decode("latin-1") for t in texts],
                                     add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in out]

    def decode_bytes(self, ids) -> bytes:
        """The bytes the ids stand for (separators dropped): exactly the input's bytes. Ids
        beyond the vocabulary (a model's padding rows can emit them) stand for nothing."""
        n = self.vocab_size
        return b"".join(self._bytes[i] for i in map(int, np.asarray(ids).reshape(-1))
                        if 0 <= i < n)

    def decode(self, ids) -> str:
        """For display: decode_bytes as UTF-8, invalid bytes shown as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class UntrainedBPE:
    """What `spec_vocab` knows of a "bpe:N" spec before training: N ids at most."""

    name: str
    vocab_size: int

    @property
    def padded_vocab_size(self) -> int:
        return padded(self.vocab_size)


CACHE_FILE = "tokenizer.json"  # where train.py keeps a "bpe:N" run's trained tokenizer
_ALLOWED = ("allowed: 'byte', 'bpe:N' (a byte-level BPE of N >= "
            f"{ByteBPETokenizer.MIN_VOCAB} ids: the 256 bytes, the separator and N - "
            f"{ByteBPETokenizer.MIN_VOCAB} merges, trained on the training split), or the path "
            "of an existing Hugging Face tokenizer.json")


def bpe_size(spec: str) -> int | None:
    """N of a "bpe:N" spec, None for any other spec; ValueError for a malformed "bpe:…"."""
    if not spec.startswith("bpe:"):
        return None
    n = spec[len("bpe:"):]
    if not (n.isascii() and n.isdigit()) or int(n) < ByteBPETokenizer.MIN_VOCAB:
        raise ValueError(f"data.tokenizer={spec!r} is invalid: {_ALLOWED}")
    return int(n)


def spec_vocab(spec: str):
    """The tokenizer of `spec`, or for "bpe:N" (not trained yet) an UntrainedBPE of N ids: what
    the model's vocabulary is sized and checked against. ValueError for a bad spec."""
    n = bpe_size(spec)
    return UntrainedBPE(spec, n) if n is not None else load_tokenizer(spec)


def load_tokenizer(spec: str, workdir: str | None = None):
    """The tokenizer `spec` names ('byte', 'bpe:N' or a tokenizer.json path; see the module
    docstring). "bpe:N" is the one train.py trained into `workdir`. ValueError otherwise."""
    if spec == "byte":
        return ByteTokenizer()
    if bpe_size(spec) is not None:
        path = os.path.join(workdir or "", CACHE_FILE)
        if workdir is None or not os.path.isfile(path):
            raise ValueError(f"data.tokenizer={spec!r} is trained by train.py into "
                             f"WORKDIR/{CACHE_FILE}, and {path!r} does not exist")
        tok = load_tokenizer(path)
        if not isinstance(tok, ByteBPETokenizer) or tok.vocab_size > bpe_size(spec):
            raise ValueError(f"{path!r} is not the byte-level BPE of data.tokenizer={spec!r}")
        tok.name = spec
        return tok
    if not os.path.isfile(spec):
        raise ValueError(f"data.tokenizer={spec!r}: {_ALLOWED}")
    try:
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(spec)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ValueError(f"data.tokenizer={spec!r} could not be loaded: {e}") from None
    if ByteBPETokenizer.is_one(tok):
        return ByteBPETokenizer(tok, os.path.abspath(spec))
    return HFTokenizer(spec)


def run_tokenizer(spec: str, workdir: str, train_documents, resuming: bool = False):
    """(tokenizer, whether it was just trained) for a train.py run in `workdir`: "bpe:N" is
    loaded from WORKDIR/tokenizer.json when a previous start left one there, else trained on
    `train_documents()` (the caller saves it once the run starts writing). ValueError when a run
    with checkpoints (`resuming`) lacks its tokenizer.json."""
    n = bpe_size(spec)
    if n is None:
        return load_tokenizer(spec), False
    path = os.path.join(workdir, CACHE_FILE)
    if os.path.isfile(path):
        return load_tokenizer(spec, workdir), False
    if resuming:
        raise ValueError(f"workdir {workdir!r} holds checkpoints trained with data.tokenizer="
                         f"{spec!r}, but not the tokenizer itself ({path!r}); use a new "
                         "--workdir")
    return ByteBPETokenizer.train(train_documents(), n, name=spec), True

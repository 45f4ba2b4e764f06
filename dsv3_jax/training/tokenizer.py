"""Tokenizers for training: byte-level (default) and a Hugging Face `tokenizer.json`.

Both expose the same small interface: `encode(text) -> np.ndarray[int32]`, `decode(ids) -> str`,
`decode_bytes(ids) -> bytes` (the bytes the ids stand for: what bits/byte and the xz reference
count), `reads_bytes` (whether `encode` takes a file's raw bytes as they are), `vocab_size` (ids
the tokenizer can emit), `separator_id` (the document separator packed between documents), and
`padded_vocab_size` (vocab rounded up to a multiple of 128: what a model needs).

Encodings: the byte tokenizer never decodes, so any file works and its ids are the file's bytes.
A text tokenizer needs text: files that are not valid UTF-8 are rejected with `NotUTF8Error`
naming the file (rather than decoded with replacement characters, which would change the bytes
the bits/byte figure and the xz reference are measured on).
"""

from __future__ import annotations

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


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """'byte' or a path to a Hugging Face tokenizer.json. Raises ValueError for a bad path."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise ValueError(f"data.tokenizer={spec!r}: allowed: 'byte' or the path of an existing "
                         "Hugging Face tokenizer.json")
    try:
        return HFTokenizer(spec)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ValueError(f"data.tokenizer={spec!r} could not be loaded: {e}") from None

"""Tokenizers for training: byte-level (default) and a Hugging Face `tokenizer.json`.

Both expose the same small interface: `encode(text) -> np.ndarray[int32]`, `decode(ids) -> str`,
`vocab_size` (ids the tokenizer can emit), `separator_id` (the document separator packed between
documents), and `padded_vocab_size` (vocab rounded up to a multiple of 128: what a model needs).
"""

from __future__ import annotations

import os

import numpy as np

VOCAB_MULTIPLE = 128


def padded(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-vocab_size // multiple) * multiple


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; id 256 separates documents. 257 ids, padded to 384."""

    name = "byte"
    vocab_size = 257
    separator_id = 256

    @property
    def padded_vocab_size(self) -> int:
        return padded(self.vocab_size)

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer.json. The separator is its end-of-text token if it has one."""

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
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in out]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                skip_special_tokens=False)


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

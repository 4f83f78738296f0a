"""The DeepSeek-OCR tokenizer through the ``tokenizers`` library (no transformers needed)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

EOS_TEXT = "<｜end▁of▁sentence｜>"


class Tokenizer:
    """Encode without special tokens and decode keeping them, as the official code calls its tokenizer."""

    def __init__(self, tokenizer: _HFTokenizer, bos_token_id: int = 0, eos_token_id: int = 1):
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    @classmethod
    def from_folder(cls, folder: str | Path, bos_token_id: int = 0, eos_token_id: int = 1) -> Tokenizer:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the model folder must hold the tokenizer files of deepseek-ai/DeepSeek-OCR"
            )
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
            raise ValueError(f"{path} is not a valid tokenizer file ({e})") from None
        return cls(tok, bos_token_id, eos_token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS added (the official ``text_encode(..., bos=False)``)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ids without a vocabulary entry decode to the empty string."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


class StreamingDetokenizer:
    """Turns tokens into text deltas as they come, never emitting half of a UTF-8 character.

    Decodes only a short window (the last emitted token onwards), so a long output costs linear time.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text

    def add(self, token: int) -> str:
        """Append a token; returns the newly complete text (possibly empty)."""
        self.tokens.append(int(token))
        before = self.tokenizer.decode(self.tokens[self._prefix : self._read])
        after = self.tokenizer.decode(self.tokens[self._prefix :])
        if after.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for its remaining bytes
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        rest = self.tokenizer.decode(self.tokens[self._prefix :])[
            len(self.tokenizer.decode(self.tokens[self._prefix : self._read])) :
        ]
        self._prefix = self._read = len(self.tokens)
        self.text += rest
        return rest

"""A byte-level tokenizer for the tiny test models (so text tasks run on them without a vocabulary file)."""
from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes folded into ``[offset, vocab_size - reserved)``; ids below ``offset`` are special."""

    def __init__(self, vocab_size: int, offset: int = 3, reserved: int = 1, pad_id: int = 0, bos_id: int = 1,
                 eos_id: int = 2):
        self.vocab_size, self.offset, self.reserved = vocab_size, offset, reserved
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_id, bos_id, eos_id
        self._span = vocab_size - reserved - offset

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.offset + (b % self._span) for b in text.encode("utf-8")]
        return ([self.bos_token_id] + ids) if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < self.offset or i >= self.offset + self._span:
                continue
            out.append((i - self.offset) % 256)
        return out.decode("utf-8", errors="replace")

    def __call__(self, texts, **kw):
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts)}
        return {"input_ids": [self.encode(t) for t in texts]}


class TinyClipTokenizer:
    """open_clip-style: ``tok(list_of_texts) -> LongTensor (N, context_length)`` with start/end tokens.

    The end token is the highest id, where open_clip's argmax pooling looks.
    """

    def __init__(self, vocab_size: int, context_length: int):
        self.vocab_size, self.context_length = vocab_size, context_length
        self.sot, self.eot = vocab_size - 2, vocab_size - 1

    def __call__(self, texts):
        import torch

        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1 + (b % (self.vocab_size - 3)) for b in t.lower().encode("utf-8")][: self.context_length - 2]
            seq = [self.sot] + ids + [self.eot]
            out[i, : len(seq)] = torch.tensor(seq)
        return out

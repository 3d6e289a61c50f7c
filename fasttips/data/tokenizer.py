"""SentencePiece tokenizer with the TIPS conventions: lower-case, no BOS/EOS, pad id 0, fixed length.

Models trained here reserve id 0 for padding (``pad_id=0, unk_id=1``, no BOS/EOS). Any other
SentencePiece ``.model`` can be used too: if its id 0 is not a pad piece, every id is shifted up by
one so that 0 stays free for padding (``vocab_size`` then counts the extra id). The serialized model
proto travels inside checkpoints (``serialized()`` / ``from_bytes``).
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import sentencepiece as spm
import torch

log = logging.getLogger(__name__)

PAD_ID = 0


class Tokenizer:
    def __init__(self, processor: spm.SentencePieceProcessor, proto: bytes, max_len: int = 64):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.sp = processor
        self._proto = proto
        self.max_len = max_len
        # Keep 0 for padding: shift ids when the model's id 0 is something else (unk, <s>, ...).
        self.offset = 0 if processor.pad_id() == PAD_ID else 1
        self.vocab_size = processor.get_piece_size() + self.offset

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes, max_len: int = 64) -> "Tokenizer":
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(data)
        return cls(sp, bytes(data), max_len)

    @classmethod
    def load(cls, path: str | os.PathLike, max_len: int = 64) -> "Tokenizer":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"data.tokenizer={str(p)!r}: no such SentencePiece .model file")
        try:
            return cls.from_bytes(p.read_bytes(), max_len)
        except OSError as exc:
            raise OSError(f"data.tokenizer={str(p)!r}: cannot read it ({exc.strerror or exc})") from None
        except RuntimeError:              # sentencepiece's only error type: the bytes are not a model proto
            raise ValueError(f"data.tokenizer={str(p)!r}: not a SentencePiece model (give a .model file "
                             "written by SentencePiece, or leave data.tokenizer empty to train one on the "
                             "captions)") from None

    @classmethod
    def train(cls, texts, vocab_size: int, path: str | os.PathLike | None = None, max_len: int = 64,
              model_type: str = "bpe") -> "Tokenizer":
        """Train on ``texts`` (lower-cased). ``vocab_size`` is an upper bound: a small corpus gives
        fewer pieces (soft limit) rather than an error. Writes ``path`` (a .model file) if given."""
        texts = [t.lower().replace("\n", " ").strip() for t in texts]
        texts = [t for t in texts if t]
        if not texts:
            raise ValueError("Tokenizer.train: no non-empty texts to train on")
        if vocab_size < 8:
            raise ValueError(f"Tokenizer.train: vocab_size must be >= 8, got {vocab_size}")
        # From memory to memory: a corpus file or model prefix would be recorded (as a random temp
        # path) in the model's trainer spec, so two trainings on the same texts (two ranks, a rerun
        # after the cache was cleared) would give different bytes and fail the resume check.
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, hard_vocab_limit=False, pad_id=PAD_ID, unk_id=1, bos_id=-1,
            eos_id=-1, num_threads=2, minloglevel=2, input_sentence_size=2_000_000,
            shuffle_input_sentence=True)
        proto = model.getvalue()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(proto)
        return cls.from_bytes(proto, max_len)

    def serialized(self) -> bytes:
        return self._proto

    # -- use ---------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids int64 [n, max_len] (truncated, padded with 0) and pad bool [n, max_len] (True = pad)."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode: texts must be a list of strings, not a single string")
        pieces = self.sp.encode([t.lower() for t in texts]) if texts else []
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.int64)
        for i, row in enumerate(pieces):
            row = row[: self.max_len]
            if row:
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64) + self.offset
        lengths = torch.tensor([min(len(r), self.max_len) for r in pieces], dtype=torch.int64)
        for i in (lengths == 0).nonzero().flatten().tolist():
            _warn_empty_caption(texts[i])
        pad = torch.arange(self.max_len)[None, :] >= lengths[:, None]
        return ids, pad

    def n_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text before ``encode`` cuts to ``max_len`` (so a count > max_len was cut)."""
        return [len(r) for r in self.sp.encode([t.lower() for t in texts])] if texts else []

    def decode(self, ids) -> str:
        ids = [int(i) - self.offset for i in ids if int(i) != PAD_ID]
        return self.sp.decode(ids)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, max_len={self.max_len})"


MAX_EMPTY_CAPTION_WARNINGS = 10
_empty_captions_seen = 0


def _warn_empty_caption(text: str) -> None:
    """A caption with no token trains its text embedding on padding alone: say so (a few times per
    process, then once that more were seen), naming the caption."""
    global _empty_captions_seen
    _empty_captions_seen += 1
    if _empty_captions_seen <= MAX_EMPTY_CAPTION_WARNINGS:
        log.warning("caption %r tokenizes to nothing (all padding); check the shard's captions", text)
        if _empty_captions_seen == MAX_EMPTY_CAPTION_WARNINGS:
            log.warning("more captions that tokenize to nothing are not reported")

"""A ``tokenizer.json`` (Hugging Face *tokenizers* format) that gives exactly fasttips' token ids.

fasttips tokenizes with SentencePiece after Python's ``str.lower()`` (fasttips.data.tokenizer). The
fast tokenizer transformers builds from ``tokenizer.model`` by itself (``Tipsv2Tokenizer``) differs on
text outside the vocabulary: it is hard-wired to byte fallback, so a model without byte pieces drops
unknown characters where SentencePiece emits ``<unk>`` (one per run of unknown characters), and
its whitespace splitting and lower-casing differ at the edges. The file written here spells out
SentencePiece's own pipeline instead, read from the model proto:

- normalizer: Python's final-sigma rule, lower-casing, the model's precompiled normalisation table
  (NFKC for the default ``nmt_nfkc``), SentencePiece's whitespace rules (only the ASCII space
  counts: leading/trailing spaces dropped, runs collapsed), then the dummy ``▁`` prefix;
- pre-tokenizer: split before every ``▁`` (SentencePiece's ``split_by_whitespace``);
- model: BPE with merges ranked by the merged piece's score (SentencePiece merges the best-scoring
  adjacent pair, leftmost first), or Unigram with the pieces' scores; runs of unknown characters
  fused into one ``<unk>`` unless the model has byte fallback.

The JSON is written directly (no *tokenizers* needed to export); :func:`check_ids` compares it with
SentencePiece on a string set when *tokenizers* is installed. The proto is read with a minimal
protobuf wire reader, so no ``protobuf`` package is needed either.
"""
from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field

import sentencepiece as spm

SPACE = "▁"
# Python's str.lower() turns a capital sigma into the final form at the end of a word (Unicode's
# Final_Sigma condition: a cased letter before it and none after it, skipping case-ignorable
# characters); the tokenizers Lowercase normaliser maps every Σ to σ. Look-behinds must be bounded:
# up to 32 case-ignorable characters between the letter and the sigma.
_CASED = r"[\p{Cased}&&\P{Case_Ignorable}]"
_FINAL_SIGMA = rf"(?<={_CASED}\p{{Case_Ignorable}}{{0,32}})Σ(?!\p{{Case_Ignorable}}*{_CASED})"
_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_CONTROL, _PIECE_USER, _PIECE_UNUSED, _PIECE_BYTE = 1, 2, 3, 4, 5, 6
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


class TokenizerExportError(ValueError):
    """A SentencePiece model whose behaviour the tokenizer.json cannot reproduce (names the setting)."""


# ------------------------------------------------------------------------------------------------
# the model proto, read field by field
# ------------------------------------------------------------------------------------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """(field number, value) pairs of a protobuf message: ints for varints, bytes for
    length-delimited fields, floats for 32-bit fields."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
        elif wire == 1:
            value, i = struct.unpack("<d", buf[i:i + 8])[0], i + 8
        else:
            raise TokenizerExportError(f"tokenizer.model: unexpected protobuf wire type {wire}")
        yield number, value


@dataclass
class SpmSpec:
    """The parts of a SentencePiece ModelProto that decide the ids (defaults as in the .proto)."""
    pieces: list[tuple[str, float, int]] = field(default_factory=list)   # (piece, score, type)
    model_type: str = "unigram"
    byte_fallback: bool = False
    split_by_whitespace: bool = True
    treat_whitespace_as_suffix: bool = False
    allow_whitespace_only_pieces: bool = False
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def read_spec(proto: bytes) -> SpmSpec:
    spec = SpmSpec()
    for number, value in _fields(proto):
        if number == 1:                                      # SentencePiece
            piece, score, kind = "", 0.0, _PIECE_NORMAL
            for n, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = float(v)
                elif n == 3:
                    kind = int(v)
            spec.pieces.append((piece, score, kind))
        elif number == 2:                                    # TrainerSpec
            for n, v in _fields(value):
                if n == 3:
                    spec.model_type = _MODEL_TYPES.get(int(v), str(v))
                elif n == 35:
                    spec.byte_fallback = bool(v)
                elif n == 22:
                    spec.split_by_whitespace = bool(v)
                elif n == 24:
                    spec.treat_whitespace_as_suffix = bool(v)
                elif n == 26:
                    spec.allow_whitespace_only_pieces = bool(v)
        elif number == 3:                                    # NormalizerSpec
            for n, v in _fields(value):
                if n == 2:
                    spec.charsmap = bytes(v)
                elif n == 3:
                    spec.add_dummy_prefix = bool(v)
                elif n == 4:
                    spec.remove_extra_whitespaces = bool(v)
                elif n == 5:
                    spec.escape_whitespaces = bool(v)
    return spec


# ------------------------------------------------------------------------------------------------
# tokenizer.json
# ------------------------------------------------------------------------------------------------
def _refuse_unsupported(spec: SpmSpec) -> None:
    def no(setting: str, why: str):
        raise TokenizerExportError(f"tokenizer.model: {setting}; {why}, which the exported "
                                   "tokenizer.json cannot reproduce")

    if spec.model_type not in ("bpe", "unigram"):
        no(f"model_type={spec.model_type}", "only bpe and unigram models are converted")
    if spec.treat_whitespace_as_suffix:
        no("treat_whitespace_as_suffix=true", "the space marker ends words instead of starting them")
    if not spec.escape_whitespaces:
        no("escape_whitespaces=false", "spaces are not replaced by ▁")
    kinds = {kind for _, _, kind in spec.pieces}
    if _PIECE_USER in kinds:
        no("user-defined symbols", "SentencePiece matches them before segmenting")
    if _PIECE_UNUSED in kinds:
        no("unused pieces", "SentencePiece re-segments around them")
    if sum(kind == _PIECE_UNKNOWN for _, _, kind in spec.pieces) != 1:
        no("no single <unk> piece", "unknown characters need one")


def _normalizer(spec: SpmSpec) -> dict:
    steps = [{"type": "Replace", "pattern": {"Regex": _FINAL_SIGMA}, "content": "ς"}, {"type": "Lowercase"}]
    if spec.charsmap:
        # tokenizers applies the table per grapheme cluster, which misses SentencePiece's entries for
        # decomposed sequences (NFD Vietnamese, Korean jamo); composing first gives its result
        steps.append({"type": "NFC"})
        steps.append({"type": "Precompiled", "precompiled_charsmap": base64.b64encode(spec.charsmap).decode()})
    if spec.remove_extra_whitespaces:      # SentencePiece counts the ASCII space only, after the table
        steps += [{"type": "Replace", "pattern": {"Regex": "^ +| +$"}, "content": ""},
                  {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if spec.add_dummy_prefix:              # only on non-empty text, as SentencePiece
        steps.append({"type": "Prepend", "prepend": SPACE})
    return {"type": "Sequence", "normalizers": steps}


def _pre_tokenizer(spec: SpmSpec) -> dict:
    return {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "never",
            "split": spec.split_by_whitespace}


def _decoder() -> dict:
    return {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}


def _bpe_merges(spec: SpmSpec) -> list[list[str]]:
    """Every split of every normal piece into two pieces, ranked by the merged piece's score
    (then by the halves' ids): the pair SentencePiece would merge first comes first."""
    ids = {p: i for i, (p, _, kind) in enumerate(spec.pieces) if kind == _PIECE_NORMAL}
    merges = []
    for piece, score, kind in spec.pieces:
        if kind != _PIECE_NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((-score, ids[piece], ids[left], ids[right], left, right))
    merges.sort()
    return [[left, right] for *_, left, right in merges]


def _model(spec: SpmSpec) -> dict:
    unk = next(i for i, (_, _, kind) in enumerate(spec.pieces) if kind == _PIECE_UNKNOWN)
    if spec.model_type == "bpe":
        return {"type": "BPE", "dropout": None, "unk_token": spec.pieces[unk][0],
                "continuing_subword_prefix": None, "end_of_word_suffix": None,
                "fuse_unk": not spec.byte_fallback, "byte_fallback": spec.byte_fallback,
                "ignore_merges": False, "vocab": {p: i for i, (p, _, _) in enumerate(spec.pieces)},
                "merges": _bpe_merges(spec)}
    return {"type": "Unigram", "unk_id": unk, "byte_fallback": spec.byte_fallback,
            "vocab": [[p, float(score)] for p, score, _ in spec.pieces]}


def tokenizer_json(proto: bytes) -> dict:
    """The tokenizer.json content that encodes like ``fasttips.data.tokenizer.Tokenizer`` (lower-cased,
    no BOS/EOS; padding and truncation are the caller's, e.g. transformers' ``padding='max_length'``)."""
    spec = read_spec(proto)
    _refuse_unsupported(spec)
    added = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (p, _, kind) in enumerate(spec.pieces) if kind in (_PIECE_CONTROL, _PIECE_UNKNOWN)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": _normalizer(spec), "pre_tokenizer": _pre_tokenizer(spec), "post_processor": None,
            "decoder": _decoder(), "model": _model(spec)}


# ------------------------------------------------------------------------------------------------
# the check
# ------------------------------------------------------------------------------------------------
def probe_texts() -> list[str]:
    """Strings where a converted tokenizer is most likely to drift from SentencePiece: text outside
    the vocabulary, case, unicode in composed and decomposed form, whitespace, digits, punctuation,
    long and empty text."""
    import unicodedata
    natural = ["Le café où nous étions était fermé", "Tiếng Việt có dấu: người, được, phở",
               "한국어 문장입니다 강아지가 뛰어요", "Größenverhältnisse der Straße", "Ελληνικά: ΟΔΟΣ της Αθήνας",
               "Русский текст: Ёжик", "日本語のテキスト：東京タワーとｶﾀｶﾅ", "عربي: كِتَابٌ"]
    return ["", " ", "   ", "\t\n", "a", "A Red Bus On A Street", "two  dogs   play ", "  leading", "trailing  ",
            "junco jay quokka zebra", "xyz qqq jjj", "ΟΔΟΣ ΣΟΦΟΣ Σ. ΑΣ'Σ", "straße ẞ", "İstanbul",
            "emoji 😀🎉 end 👨‍👩‍👧 🇫🇷", "ﬁne ligatures ﬀ", "℃ and ㎏ and ½ and ①",
            "numbers 0123456789 3.14 1,000,000", "punctuation!? (a) [b] {c} <d> \"e\" 'f' ...;: — – …",
            "tab\there\nnew line\r\nend", "non\u00a0breaking\u2003space\u3000ideographic", "zero\u200bwidth\u200djoin",
            "ogham\u1680space", "▁marker ▁▁x", "<pad> <unk> </s>", "a" * 200,
            " ".join(["Long Caption With Many Words"] * 20), "MiXeD CaSe WoRdS", "ǅ ﬃ Ⅻ"] + [
        unicodedata.normalize(form, text) for text in natural for form in ("NFC", "NFD")]


def sentencepiece_ids(proto: bytes, texts: list[str]) -> list[list[int]]:
    """fasttips' ids before padding (lower-cased, no BOS/EOS; the pad-at-0 shift is refused elsewhere)."""
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    return sp.encode([t.lower() for t in texts])


def check_ids(content: dict, proto: bytes, texts: list[str] | None = None) -> None:
    """Raise :class:`TokenizerExportError` naming the first text whose ids differ; a no-op when the
    *tokenizers* package is not installed (the export itself does not need it)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return
    import json
    texts = probe_texts() if texts is None else texts
    if content["model"]["type"] == "Unigram":
        # tokenizers' Unigram lattice holds the control pieces too: the literal text "<pad>" becomes
        # that piece where SentencePiece spells it out (documented in docs/interop.md)
        names = [t["content"] for t in content["added_tokens"]]
        texts = [t for t in texts if not any(n in t.lower() for n in names)]
    fast = Tokenizer.from_str(json.dumps(content))
    fast.encode_special_tokens = True          # "<pad>" in a caption is text to SentencePiece
    got = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    for text, want, have in zip(texts, sentencepiece_ids(proto, texts), got):
        if want != have:
            raise TokenizerExportError(f"tokenizer.model: the converted tokenizer gives {have[:12]} for {text!r} "
                                       f"but SentencePiece {want[:12]}; not exported")

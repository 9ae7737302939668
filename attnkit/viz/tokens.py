"""Readable token labels for figures: undo byte-level BPE (Ġ, Ċ) and SentencePiece (▁, <0x0A>) markers.

Labels stay one per token, so they line up with the attention axes: whitespace-only tokens become visible
(``␣``, ``↵``, ``⇥``), a UTF-8 character split over several byte tokens shows those bytes as ``‹e2 80›``,
special tokens are kept verbatim, and characters the plotting font cannot draw (emoji) are written ``U+1F642``.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from typing import Any

SPACE, NEWLINE, TAB = "\u2423", "\u21b5", "\u21e5"  # ␣ ↵ ⇥
_SCHEMES = ("byte_level", "sentencepiece", "plain")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, inverted: each printable stand-in character -> the byte it encodes.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, …) are shifted to
    U+0100 onwards in byte order, which is where ``Ġ`` (space, 0x20) and ``Ċ`` (newline, 0x0A) come from.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    decoder = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            decoder[chr(256 + shifted)] = b
            shifted += 1
    return decoder


def piece_bytes(piece: str, scheme: str) -> bytes:
    """The raw bytes a token piece stands for under ``scheme`` ("byte_level", "sentencepiece" or "plain").

    Example:
        >>> piece_bytes("Ġcapital", "byte_level"), piece_bytes("▁the", "sentencepiece"), piece_bytes("<0x0A>", "sentencepiece")
        (b' capital', b' the', b'\\n')
    """
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme must be one of {_SCHEMES} (got {scheme!r})")
    if scheme == "byte_level":
        decoder = _byte_decoder()
        if all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
        return piece.encode("utf-8")  # not a byte-level piece (e.g. an added token): take it literally
    if scheme == "sentencepiece":
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode("utf-8")
    return piece.encode("utf-8")


def readable_token(
    piece: str,
    scheme: str = "byte_level",
    *,
    special: Collection[str] = (),
    space_marker: str = "",
    newline: str = NEWLINE,
    tab: str = TAB,
    drawable_only: bool = True,
) -> str:
    """Turn one raw token piece into a short readable label.

    Args:
        piece: the token as ``tokenizer.convert_ids_to_tokens`` returns it (``"Ġcapital"``, ``"▁the"``, ``"Ċ"``).
        scheme: how the tokenizer encodes bytes (see :func:`piece_bytes`).
        special: special tokens, returned unchanged.
        space_marker: what a token's leading spaces become (default: dropped, so ``"Ġcapital"`` reads
            ``"capital"``). Tokens made only of spaces show one marker (default ``␣``) per space.
        newline, tab: what ``\\n`` and ``\\t`` become.
        drawable_only: write characters the default matplotlib font lacks as ``U+XXXX`` (avoids empty boxes).

    Example:
        >>> [readable_token(p) for p in ["Ġcapital", "Ċ", "ĠĠ", "ĉ", "ĠcafÃ©"]]
        ['capital', '↵', '␣␣', '⇥', 'café']
    """
    if piece in special:
        return piece
    raw = piece_bytes(piece, scheme)
    text = _decode_or_hex(raw)
    if text and text.strip(" ") == "":
        return (space_marker or SPACE) * len(text)
    text = text.replace("\n", newline).replace("\r", "\\r").replace("\t", tab)
    text = _mark_spaces(text, space_marker)
    return _drawable(text) if drawable_only else text


def token_labels(tokenizer: Any, ids: Any, *, scheme: str = "auto", **options: Any) -> list[str]:
    """One readable label per token id, for the ``tokens=`` argument of the attnkit.viz functions.

    Args:
        tokenizer: a Hugging Face tokenizer (needs ``convert_ids_to_tokens``; ``all_special_tokens`` is used
            when present).
        ids: a 1-D sequence / tensor of ids, or ``[1, N]`` (a batch of one).
        scheme: "auto" (inspect the tokenizer's vocabulary), "byte_level", "sentencepiece", or "plain".
        **options: passed to :func:`readable_token` (``space_marker``, ``newline``, ``tab``, ``drawable_only``).

    Example:
        >>> from attnkit.models import smollm2_path
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained(smollm2_path().parent, gguf_file=smollm2_path().name)  # doctest: +SKIP
        >>> token_labels(tok, tok("<|im_start|>The capital\\n")["input_ids"])  # doctest: +SKIP
        ['<|im_start|>', 'The', 'capital', '↵']
    """
    flat = _flat_ids(ids)
    pieces = tokenizer.convert_ids_to_tokens(flat)
    if scheme == "auto":
        scheme = detect_scheme(tokenizer)
    special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    return [readable_token(str(p), scheme, special=special, **options) for p in pieces]


def detect_scheme(tokenizer: Any) -> str:
    """Guess how a tokenizer writes bytes: "byte_level" (GPT-2 ``Ġ``), "sentencepiece" (``▁``) or "plain".

    Example:
        >>> class Toy:
        ...     def get_vocab(self):
        ...         return {"▁the": 0, "▁cat": 1, "s": 2}
        >>> detect_scheme(Toy())
        'sentencepiece'
    """
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    byte_level = sum(1 for piece in vocab if piece.startswith(("\u0120", "\u010a")))
    sentencepiece = sum(1 for piece in vocab if piece.startswith("\u2581"))
    if max(byte_level, sentencepiece) == 0:
        return "plain"
    return "byte_level" if byte_level >= sentencepiece else "sentencepiece"


def _flat_ids(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = list(ids)
    if len(ids) == 1 and isinstance(ids[0], (list, tuple)):
        ids = list(ids[0])
    if any(isinstance(i, (list, tuple)) for i in ids):
        raise ValueError(f"ids must be one sequence of token ids, [N] or [1, N] (got {len(ids)} sequences)")
    return [int(i) for i in ids]


def _decode_or_hex(raw: bytes) -> str:
    """UTF-8 text, or ``‹e2 80›`` for bytes that are only part of a character."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "\u2039" + " ".join(f"{b:02x}" for b in raw) + "\u203a"


def _mark_spaces(text: str, marker: str) -> str:
    """Replace leading spaces with ``marker`` (default: drop them); inner spaces stay."""
    stripped = text.lstrip(" ")
    return marker * (len(text) - len(stripped)) + stripped


@functools.lru_cache(maxsize=1)
def _font_codepoints() -> frozenset[int]:
    """Code points the default matplotlib font can draw."""
    import matplotlib
    from matplotlib import font_manager, ft2font

    path = font_manager.findfont(font_manager.FontProperties(family=matplotlib.rcParams["font.family"]))
    return frozenset(ft2font.FT2Font(path).get_charmap())


def _drawable(text: str) -> str:
    covered = _font_codepoints()
    return "".join(ch if ord(ch) in covered or ch.isspace() else f"U+{ord(ch):04X}" for ch in text)


__all__: Sequence[str] = ["detect_scheme", "piece_bytes", "readable_token", "token_labels"]

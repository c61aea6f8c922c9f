"""Tokenisers for FIBER: a byte-level BPE and a RoBERTa adapter (MLM masking: :mod:`fiber_data.text.masking`;
character spans to tokens: :mod:`fiber_data.text.spans`).

Implements the text side of docs/reference/training.md §1.1 (``<s> text </s>``, truncated and padded to a fixed length, 40 tokens in
  the coarse stage) with two interchangeable implementations of the :class:`~fiber_data.types.Tokenizer`
  Protocol: :class:`ByteBPETokenizer` (trainable offline, RoBERTa id layout) and :class:`HFTokenizer` (wraps a
  Hugging Face ``transformers`` fast tokenizer such as ``roberta-base``).

:class:`ByteBPETokenizer` runs on Hugging Face ``tokenizers`` (Rust): its ``BpeTrainer`` learns the merges and
a ``BPE`` model with the GPT-2/RoBERTa byte-level pre-tokenizer encodes and returns character offsets. Text is
split into pre-tokens (words with their leading space, digit runs, punctuation runs, white space), each
pre-token's UTF-8 bytes are mapped to printable characters and merged with the learned merge list. The ids are
laid out as RoBERTa's (specials first, ``<mask>`` last) and the file format (``fiber_byte_bpe`` version 1, a
merge list) is the one the earlier pure-Python implementation wrote, so its tokenizers load and give the same
ids. The ``vocab.json``/``merges.txt`` export is readable by ``transformers``' RoBERTa tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from os import PathLike
from pathlib import Path
from typing import Any, Literal, cast

import torch
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from torch import Tensor

from fiber_data.errors import MissingExtraError, TokenizerError
from fiber_data.types import Encoding

__all__ = ["ByteBPETokenizer", "HFTokenizer", "load_tokenizer"]

Padding = Literal["max_length", "longest"]

_SPECIALS_HEAD = ("<s>", "<pad>", "</s>", "<unk>")
_MASK = "<mask>"
_FORMAT = "fiber_byte_bpe"
_FORMAT_VERSION = 1


@lru_cache(maxsize=1)
def _byte_to_char() -> tuple[str, ...]:
    """The GPT-2 reversible map from the 256 byte values to printable Unicode characters, in byte order.

    Printable Latin-1 bytes map to themselves; the others (controls, space, ...) map to ``chr(256 + n)`` in
    byte order, so that every token is a printable string (space becomes ``"Ġ"``). The set equals
    ``tokenizers.pre_tokenizers.ByteLevel.alphabet()``; the order fixes the ids 4..259.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table: list[str] = []
    extra = 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return tuple(table)


class _BatchTokenizer:
    """The batch call every tokenizer of this module shares: argument checks, then :meth:`_encode`."""

    def __call__(
        self,
        texts: Sequence[str],
        *,
        max_length: int,
        padding: Padding = "max_length",
    ) -> Encoding:
        """Tokenise a batch as ``<s> text </s>``, truncated to ``max_length`` and padded with ``<pad>``.

        Args:
            texts: ``B`` strings (a single ``str`` is treated as a batch of one).
            max_length: maximal length ``L`` including ``<s>`` and ``</s>`` (at least 2).
            padding: ``"max_length"`` pads to exactly ``max_length``; ``"longest"`` to the longest sample.

        Returns:
            :class:`~fiber_data.types.Encoding` with ``input_ids [B, L]``, ``attention_mask [B, L]`` and
            character offsets (``(0, 0)`` for specials and padding).
        """
        if isinstance(texts, str):
            texts = [texts]
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        return self._encode(list(texts), max_length, padding)

    def _encode(self, texts: list[str], max_length: int, padding: Padding) -> Encoding:
        raise NotImplementedError


class ByteBPETokenizer(_BatchTokenizer):
    """Byte-level BPE tokenizer with RoBERTa's special tokens and id layout, on Hugging Face ``tokenizers``.

    Ids: ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, the 256 byte tokens = 4..259 (byte order),
    one id per new token in merge order, and ``<mask>`` last (``vocab_size - 1``). Every string is encodable
    (byte fall-back), so ``<unk>`` is never produced. Special-token strings inside a text are ordinary text.

    Build with :meth:`train` or :meth:`load`; the constructor takes a merge list.

    Args:
        merges: ordered merges, each a pair of token strings in the byte-character alphabet. A merge may
            spell a token an earlier merge already produced (the trainer emits such merges); it then adds no id.

    Attributes:
        vocab_size: number of ids (``261 +`` the number of distinct merged tokens).
        pad_token_id / bos_token_id / eos_token_id / unk_token_id / mask_token_id: special ids.
        special_ids: the five special ids.
        backend: the ``tokenizers.Tokenizer`` doing the work (no specials added, offsets trimmed as RoBERTa's).
    """

    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    unk_token_id: int = 3

    def __init__(self, merges: Sequence[tuple[str, str]]) -> None:
        tokens: list[str] = list(_SPECIALS_HEAD) + list(_byte_to_char())
        index = {t: i for i, t in enumerate(tokens)}
        self.merges: tuple[tuple[str, str], ...] = tuple((str(a), str(b)) for a, b in merges)
        for rank, (a, b) in enumerate(self.merges):
            if a not in index or b not in index:
                raise ValueError(f"merge {rank} ({a!r}, {b!r}) uses a token that no earlier merge produced")
            merged = a + b
            if merged in _SPECIALS_HEAD or merged == _MASK:
                raise ValueError(f"merge {rank} ({a!r}, {b!r}) spells the special token {merged!r}")
            if merged not in index:
                index[merged] = len(tokens)
                tokens.append(merged)
        tokens.append(_MASK)
        index[_MASK] = len(tokens) - 1
        self._id_to_token: list[str] = tokens
        self._token_to_id: dict[str, int] = index
        self.vocab_size: int = len(tokens)
        self.mask_token_id: int = len(tokens) - 1
        self.special_ids: frozenset[int] = frozenset({0, 1, 2, 3, self.mask_token_id})
        self.backend: _RustTokenizer = self._build_backend(index, self.merges)

    @staticmethod
    def _build_backend(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> _RustTokenizer:
        """A ``tokenizers`` pipeline equal to RoBERTa's fast tokenizer, without special-token handling."""
        backend = _RustTokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        # Only its offset trimming is used (encode(..., add_special_tokens=False)): spans drop the leading
        # space a token carries, exactly as RoBERTa's (processors.ByteLevel trims a lone space differently).
        backend.post_processor = processors.RobertaProcessing(
            ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
        )
        return backend

    # ------------------------------------------------------------------ training
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
    ) -> ByteBPETokenizer:
        """Learn merges from ``texts`` with ``tokenizers``' ``BpeTrainer`` (deterministic, order-independent).

        At every step the most frequent adjacent pair (counted over pre-token occurrences) is merged; ties go
        to the pair of smallest token ids. Training stops when ``vocab_size`` ids exist or no pair occurs
        ``min_frequency`` times, so the result may be smaller than ``vocab_size``. The same texts (in any
        order) and arguments give the same merges, in any process and with or without the trainer's threads.

        Args:
            texts: training strings.
            vocab_size: wanted number of ids, specials and the 256 byte tokens included (at least 261).
            min_frequency: smallest count for a pair to be merged.

        Returns:
            The trained tokenizer.
        """
        base = len(_SPECIALS_HEAD) + 256 + 1
        if vocab_size < base:
            raise ValueError(f"vocab_size must be at least {base} (specials + 256 bytes), got {vocab_size}")
        corpus = list(texts)
        for i, text in enumerate(corpus):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        backend = _RustTokenizer(models.BPE(unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[*_SPECIALS_HEAD, _MASK],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(corpus, trainer=trainer)
        merges = json.loads(backend.to_str())["model"]["merges"]  # [a, b] pairs; "a b" strings before 0.20
        # cast: an "a b" merge string holds exactly one space (the tokenizers library writes it)
        return cls(
            [
                cast("tuple[str, str]", tuple(m.split(" "))) if isinstance(m, str) else (str(m[0]), str(m[1]))
                for m in merges
            ]
        )

    # ------------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Encode one string without specials.

        Args:
            text: the string.

        Returns:
            ``(ids, offsets)``: token ids and per-token ``(start, end)`` character spans into ``text``. Spans
            exclude the leading space a token carries (RoBERTa's ``trim_offsets``), so ``text[start:end]`` is
            the word itself; offsets equal those of ``transformers``' RoBERTa fast tokenizer.
        """
        enc = self.backend.encode(text, add_special_tokens=False)
        return list(enc.ids), [(int(s), int(e)) for s, e in enc.offsets]

    def _encode(self, texts: list[str], max_length: int, padding: Padding) -> Encoding:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for <s> and </s>), got {max_length}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        encoded = self.backend.encode_batch(list(texts), add_special_tokens=False)
        keep = max_length - 2
        kept = [e.ids[:keep] for e in encoded]
        length = max_length if padding == "max_length" else max((len(k) + 2 for k in kept), default=2)
        bos, eos, pad = self.bos_token_id, self.eos_token_id, self.pad_token_id
        rows = [[bos, *k, eos, *([pad] * (length - len(k) - 2))] for k in kept]
        input_ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)
        lengths = torch.tensor([len(k) + 2 for k in kept], dtype=torch.long)
        attention_mask = torch.arange(length)[None, :] < lengths[:, None]
        none = [(0, 0)] * length
        spans = [[(0, 0), *e.offsets[:keep], *none[: length - len(k) - 1]] for e, k in zip(encoded, kept)]
        return Encoding(input_ids=input_ids, attention_mask=attention_mask, offsets=spans)

    def decode(self, ids: Sequence[int] | Tensor, *, skip_special_tokens: bool = True) -> str:
        """Turn ids back into text.

        Args:
            ids: token ids (a list or a 1-D tensor).
            skip_special_tokens: drop ``<s>``, ``<pad>``, ``</s>``, ``<unk>`` and ``<mask>``.

        Returns:
            The decoded string (invalid UTF-8 from partial byte sequences is replaced by U+FFFD).
        """
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        out: list[int] = []
        for raw in ids:
            i = int(raw)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
            if not (skip_special_tokens and i in self.special_ids):
                out.append(i)
        # The specials are ordinary vocabulary entries of the backend, so they decode to their own spelling.
        return str(self.backend.decode(out, skip_special_tokens=False))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Token strings (byte-character alphabet, ``"Ġ"`` = space) of ``ids``."""
        return [self._id_to_token[int(i)] for i in ids]

    def get_vocab(self) -> dict[str, int]:
        """A copy of the token-to-id map (RoBERTa ``vocab.json`` layout)."""
        return dict(self._token_to_id)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | PathLike[str]) -> Path:
        """Write the tokenizer as one JSON file (``{"type": "fiber_byte_bpe", "version", "merges"}``).

        Args:
            path: output file.

        Returns:
            The path written.
        """
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "type": _FORMAT,
            "version": _FORMAT_VERSION,
            "special_tokens": {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": _MASK},
            "vocab_size": self.vocab_size,
            "merges": [f"{a} {b}" for a, b in self.merges],
        }
        p.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | PathLike[str]) -> ByteBPETokenizer:
        """Read a tokenizer written by :meth:`save`.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not a ``fiber_byte_bpe`` tokenizer or is inconsistent.
        """
        p = Path(path)
        try:
            payload = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from exc
        if not isinstance(payload, dict) or payload.get("type") != _FORMAT:
            raise ValueError(f'{p}: not a fiber byte-level BPE tokenizer (expected "type": "{_FORMAT}")')
        if payload.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{p}: unsupported tokenizer version {payload.get('version')!r}")
        merges = []
        for i, line in enumerate(payload.get("merges", [])):
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{p}: merges[{i}] = {line!r} is not two tokens separated by one space")
            merges.append((parts[0], parts[1]))
        tok = cls(merges)
        if "vocab_size" in payload and payload["vocab_size"] != tok.vocab_size:
            raise ValueError(f"{p}: vocab_size {payload['vocab_size']} does not match the merges ({tok.vocab_size})")
        return tok

    def save_pretrained(self, directory: str | PathLike[str]) -> Path:
        """Export as a RoBERTa tokenizer folder (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``).

        The folder loads with ``transformers.AutoTokenizer.from_pretrained(directory)`` and with
        :class:`HFTokenizer`, and gives the same ids and offsets as this tokenizer.

        Args:
            directory: output folder (created).

        Returns:
            The folder.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "vocab.json").write_text(json.dumps(self.get_vocab(), ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in self.merges]
        (d / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        config = {
            "tokenizer_class": "RobertaTokenizer",
            "model_max_length": 512,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "sep_token": "</s>",
            "cls_token": "<s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "mask_token": _MASK,
            "add_prefix_space": False,
            "trim_offsets": True,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        return d

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, merges={len(self.merges)})"


class HFTokenizer(_BatchTokenizer):
    """Adapter from a Hugging Face *fast* tokenizer (e.g. ``roberta-base``) to the ``Tokenizer`` Protocol.

    Needs the ``[hf]`` extra. Offsets come from the fast tokenizer's ``offset_mapping`` (``(0, 0)`` for
    specials and padding, as for :class:`ByteBPETokenizer`).

    Args:
        tokenizer: a ``transformers`` fast tokenizer with ``bos``/``eos``/``pad``/``mask`` tokens.

    Attributes:
        vocab_size: ``len(tokenizer)`` (added tokens included; RoBERTa: 50265).
        pad_token_id / bos_token_id / eos_token_id / mask_token_id: special ids (RoBERTa: 1 / 0 / 2 / 50264).
        special_ids: all special ids of the tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("HFTokenizer needs a fast tokenizer (offsets come from the Rust backend)")
        missing = [
            n
            for n in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")
            if getattr(tokenizer, n, None) is None
        ]
        if missing:
            raise ValueError(f"the tokenizer lacks special tokens: {', '.join(missing)}")
        self.tokenizer = tokenizer
        self.vocab_size: int = len(tokenizer)
        self.pad_token_id: int = int(tokenizer.pad_token_id)
        self.bos_token_id: int = int(tokenizer.bos_token_id)
        self.eos_token_id: int = int(tokenizer.eos_token_id)
        self.mask_token_id: int = int(tokenizer.mask_token_id)
        self.special_ids: frozenset[int] = frozenset(int(i) for i in tokenizer.all_special_ids)

    @classmethod
    def from_pretrained(cls, name_or_path: str | PathLike[str], **kwargs: Any) -> HFTokenizer:
        """Load with ``transformers.AutoTokenizer.from_pretrained`` (local folder, or hub name if online).

        Args:
            name_or_path: a local tokenizer folder or a hub id such as ``"roberta-base"``.
            **kwargs: passed to ``from_pretrained``.
        """
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise MissingExtraError("transformers", "hf", "HFTokenizer") from exc
        return cls(AutoTokenizer.from_pretrained(str(name_or_path), **kwargs))

    def _encode(self, texts: list[str], max_length: int, padding: Padding) -> Encoding:
        out = self.tokenizer(
            texts,
            max_length=max_length,
            padding=padding,
            truncation=True,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        offsets = [[(int(s), int(e)) for s, e in row] for row in out["offset_mapping"].tolist()]
        return Encoding(
            input_ids=out["input_ids"].long(),
            attention_mask=out["attention_mask"].bool(),
            offsets=offsets,
        )

    def decode(self, ids: Sequence[int] | Tensor, *, skip_special_tokens: bool = True) -> str:
        """Decode ids with the wrapped tokenizer."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.tokenizer).__name__}, vocab_size={self.vocab_size})"


def _is_fiber_file(path: Path) -> bool:
    """Whether ``path`` is a JSON file written by :meth:`ByteBPETokenizer.save`."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and payload.get("type") == _FORMAT


def load_tokenizer(path_or_name: str | PathLike[str]) -> ByteBPETokenizer | HFTokenizer:
    """Load a tokenizer, choosing the implementation from what ``path_or_name`` is.

    - a JSON file with ``"type": "fiber_byte_bpe"`` → :class:`ByteBPETokenizer`;
    - a folder holding ``fiber_tokenizer.json`` or a ``tokenizer.json`` of that type (a synthetic world's
      root) → :class:`ByteBPETokenizer`;
    - a folder holding ``tokenizer.json``, ``tokenizer_config.json`` or ``vocab.json`` → :class:`HFTokenizer`;
    - a string that is not an existing path (e.g. ``"roberta-base"``) → :class:`HFTokenizer` via the hub cache.

    Raises:
        TokenizerError: nothing usable was found (a ``ValueError``); the message says what was tried and what to
            do.
    """
    p = Path(path_or_name)
    if p.is_file():
        try:
            payload = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"not a tokenizer file (not JSON: {exc})", file=p) from exc
        if isinstance(payload, dict) and payload.get("type") == _FORMAT:
            return ByteBPETokenizer.load(p)
        raise TokenizerError(
            "not a fiber byte-level BPE tokenizer file; pass the folder of a Hugging Face tokenizer instead", file=p
        )
    if p.is_dir():
        for candidate in (p / "fiber_tokenizer.json", p / "tokenizer.json"):
            if candidate.is_file() and _is_fiber_file(candidate):
                return ByteBPETokenizer.load(candidate)
        if any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            return HFTokenizer.from_pretrained(p)
        raise TokenizerError(
            "folder holds no tokenizer (looked for fiber_tokenizer.json, tokenizer.json, tokenizer_config.json, "
            "vocab.json)",
            file=p,
        )
    name = str(path_or_name)
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(".json") or name.count("/") > 1
    if looks_like_path or (os.sep != "/" and os.sep in name):
        raise TokenizerError("tokenizer path does not exist", file=name)
    try:
        return HFTokenizer.from_pretrained(name)
    except MissingExtraError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or "connect" in str(exc).lower()
        todo = (
            "the hub cannot be reached (offline): download the tokenizer once on a machine with network, e.g. "
            f"`hf download {name} --local-dir DIR` (or AutoTokenizer.from_pretrained(...).save_pretrained(DIR)), "
            "and set the tokenizer setting (data.tokenizer) to DIR"
            if offline
            else f"check the name, or give a tokenizer file or folder ({type(exc).__name__}: {first})"
        )
        raise TokenizerError(
            f"cannot load tokenizer {name!r}: not an existing file or folder, and not in the Hugging Face hub cache; "
            + todo
        ) from exc

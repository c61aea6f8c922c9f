"""ByteBPETokenizer, HFTokenizer, load_tokenizer, mask_tokens and positive maps."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fiber_data import (
    ByteBPETokenizer,
    Encoding,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    mask_tokens,
    positive_map_from_spans,
)

CORPUS = [
    "a large red circle in the top left",
    "the image shows a small blue square at the bottom right.",
    "Hello  world, it's 2024! Café crème, naïve façade.",
    "tabs\tand\nnew lines   and_underscores -- (brackets) [x] 3.14",
    "emoji 🙂 and 中文 characters",
] * 20

TEXTS = [
    "a large red circle in the top left",
    "Hello  world, it's 2024!",
    "unseen words: zebra quokka 42 ünïcödé 🙂",
    "",
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def bpe() -> ByteBPETokenizer:
    return ByteBPETokenizer.train(CORPUS, 420)


def test_satisfies_protocol_and_roberta_special_layout(bpe: ByteBPETokenizer) -> None:
    assert isinstance(bpe, Tokenizer)
    assert (bpe.bos_token_id, bpe.pad_token_id, bpe.eos_token_id, bpe.unk_token_id) == (0, 1, 2, 3)
    assert bpe.mask_token_id == bpe.vocab_size - 1
    assert bpe.convert_ids_to_tokens([0, 1, 2, 3, bpe.mask_token_id]) == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert bpe.vocab_size == 261 + len({a + b for a, b in bpe.merges}) <= 420
    vocab = bpe.get_vocab()
    assert sorted(vocab.values()) == list(range(bpe.vocab_size))


def test_training_is_deterministic_and_order_independent(bpe: ByteBPETokenizer) -> None:
    shuffled = list(CORPUS)
    random.Random(1).shuffle(shuffled)
    again = ByteBPETokenizer.train(shuffled, 420)
    assert again.merges == bpe.merges
    small = ByteBPETokenizer.train(CORPUS, 300)
    assert small.merges == bpe.merges[:39]  # the first merges do not depend on the budget
    with pytest.raises(ValueError, match="at least 261"):
        ByteBPETokenizer.train(CORPUS, 100)


def test_round_trip_and_offsets_point_at_the_token_text(bpe: ByteBPETokenizer) -> None:
    enc = bpe(TEXTS, max_length=128, padding="longest")
    for i, text in enumerate(TEXTS):
        ids = enc.input_ids[i][enc.attention_mask[i]].tolist()
        assert ids[0] == bpe.bos_token_id and ids[-1] == bpe.eos_token_id
        assert bpe.decode(ids) == text
        assert bpe.decode(ids, skip_special_tokens=False).startswith("<s>")
        for t, (s, e) in enumerate(enc.offsets[i]):
            if t == 0 or t >= len(ids) - 1:
                assert (s, e) == (0, 0)  # specials and padding
                continue
            piece = bpe.decode([ids[t]])
            if piece.strip() and "\ufffd" not in piece:  # whole characters: the span is the token minus its space
                assert text[s:e] == piece.strip()
    # Offsets let a word be found from its characters.
    enc1 = bpe(["a large red circle"], max_length=16)
    start = "a large red circle".index("red")
    t = enc1.char_to_token(0, start)
    assert t is not None and bpe.decode([int(enc1.input_ids[0, t])]) == " red"
    assert enc1.char_to_token(0, start - 1) is None  # the space belongs to no span


def test_truncation_and_padding(bpe: ByteBPETokenizer) -> None:
    long_text = " ".join(["circle"] * 100)
    enc = bpe([long_text, "red"], max_length=40)
    assert enc.input_ids.shape == (2, 40) and enc.input_ids.dtype == torch.long
    assert enc.attention_mask.dtype == torch.bool
    assert enc.attention_mask[0].all() and enc.input_ids[0, -1] == bpe.eos_token_id
    n = int(enc.attention_mask[1].sum())
    assert enc.input_ids[1, n - 1] == bpe.eos_token_id and (enc.input_ids[1, n:] == bpe.pad_token_id).all()
    assert all(o == (0, 0) for o in enc.offsets[1][n:]) and len(enc.offsets[1]) == 40
    longest = bpe(["red", "red circle"], max_length=40, padding="longest")
    assert longest.input_ids.shape[1] == int(longest.attention_mask[1].sum()) < 40
    assert bpe("red", max_length=8).input_ids.shape == (1, 8)  # a bare string is a batch of one
    with pytest.raises(ValueError, match="max_length"):
        bpe(["x"], max_length=1)


def test_save_load_round_trip(bpe: ByteBPETokenizer, tmp_path: Path) -> None:
    path = bpe.save(tmp_path / "tok.json")
    loaded = ByteBPETokenizer.load(path)
    assert loaded.merges == bpe.merges and loaded.vocab_size == bpe.vocab_size
    a, b = bpe(TEXTS, max_length=32), loaded(TEXTS, max_length=32)
    assert torch.equal(a.input_ids, b.input_ids) and a.offsets == b.offsets
    assert isinstance(load_tokenizer(path), ByteBPETokenizer)
    payload = json.loads(path.read_text())
    payload["type"] = "other"
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="bad.json"):
        ByteBPETokenizer.load(tmp_path / "bad.json")


def test_matches_transformers_roberta_tokenizer_and_hf_adapter(bpe: ByteBPETokenizer, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    folder = bpe.save_pretrained(tmp_path / "hf")
    hf = load_tokenizer(folder)
    assert isinstance(hf, HFTokenizer) and isinstance(hf, Tokenizer)
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.mask_token_id, hf.vocab_size) == (
        0, 1, 2, bpe.mask_token_id, bpe.vocab_size,
    )  # fmt: skip
    ascii_texts = [t for t in TEXTS if t.isascii()] + ["a small blue square at the bottom right."]
    for padding in ("max_length", "longest"):
        ours = bpe(ascii_texts, max_length=12, padding=padding)
        theirs = hf(ascii_texts, max_length=12, padding=padding)
        assert isinstance(theirs, Encoding)
        assert torch.equal(ours.input_ids, theirs.input_ids)
        assert torch.equal(ours.attention_mask, theirs.attention_mask)
        assert ours.offsets == theirs.offsets
    assert hf.decode(hf(["red circle"], max_length=8).input_ids[0]) == "red circle"


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing" / "tok.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a fiber byte-level BPE"):
        load_tokenizer(tmp_path / "x.json")


def test_mask_tokens_statistics_and_specials() -> None:
    g = torch.Generator().manual_seed(0)
    vocab, mask_id = 1000, 999
    b, length = 256, 64
    ids = torch.randint(4, vocab - 1, (b, length), generator=g)
    lengths = torch.randint(2, length + 1, (b,), generator=g)
    attn = torch.arange(length)[None, :] < lengths[:, None]
    ids[:, 0] = 0
    ids[torch.arange(b), lengths - 1] = 2
    ids[~attn] = 1
    masked, labels = mask_tokens(
        ids, attn, mask_token_id=mask_id, vocab_size=vocab, special_ids={0, 1, 2}, probability=0.15, generator=g
    )
    assert masked.shape == labels.shape == ids.shape and masked.dtype == labels.dtype == torch.long
    selected = labels != -100
    eligible = attn & ~torch.isin(ids, torch.tensor([0, 1, 2]))
    assert not (selected & ~eligible).any()  # specials and padding never selected
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])  # unselected tokens untouched
    n = int(eligible.sum())
    rate = selected.sum().item() / n
    assert abs(rate - 0.15) < 4 * (0.15 * 0.85 / n) ** 0.5
    k = int(selected.sum())
    to_mask = (masked == mask_id) & selected
    kept = (masked == ids) & selected
    frac_mask, frac_kept = to_mask.sum().item() / k, kept.sum().item() / k
    assert abs(frac_mask - 0.8) < 4 * (0.8 * 0.2 / k) ** 0.5
    # "kept" = the 10 % left unchanged plus random draws that hit the same id (1/1000 chance).
    assert abs(frac_kept - 0.1) < 4 * (0.1 * 0.9 / k) ** 0.5
    random_frac = 1 - frac_mask - frac_kept
    assert abs(random_frac - 0.1) < 4 * (0.1 * 0.9 / k) ** 0.5
    # Same generator seed → same masks.
    again = mask_tokens(
        ids,
        attn,
        mask_token_id=mask_id,
        vocab_size=vocab,
        special_ids={0, 1, 2},
        generator=torch.Generator().manual_seed(5),
    )
    again2 = mask_tokens(
        ids,
        attn,
        mask_token_id=mask_id,
        vocab_size=vocab,
        special_ids={0, 1, 2},
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(again[0], again2[0]) and torch.equal(again[1], again2[1])


def test_mask_tokens_all_or_nothing() -> None:
    ids = torch.tensor([[0, 5, 6, 7, 2, 1]])
    attn = ids != 1
    masked, labels = mask_tokens(ids, attn, mask_token_id=9, vocab_size=10, special_ids={0, 1, 2}, probability=1.0)
    assert labels.tolist() == [[-100, 5, 6, 7, -100, -100]]
    masked, labels = mask_tokens(ids, attn, mask_token_id=9, vocab_size=10, special_ids={0, 1, 2}, probability=0.0)
    assert torch.equal(masked, ids) and (labels == -100).all()


def test_positive_map_against_offset_overlap(bpe: ByteBPETokenizer) -> None:
    caption = "a big red circle in the top left and a small blue plus sign at the bottom"
    enc = bpe([caption], max_length=64)
    phrases = ["big red circle", "small blue plus sign", "bottom"]
    spans = [[(caption.index(p), caption.index(p) + len(p))] for p in phrases]
    spans.append([(caption.index("red"), caption.index("red") + 3), (caption.index("blue"), caption.index("blue") + 4)])
    pm = positive_map_from_spans(enc, spans, normalize=False)
    assert pm.shape == (4, 64)
    # Reference: per span, every token from the first to the last one whose characters overlap it
    # (a lone-space token inside a phrase, with an empty span, is covered by the range).
    for j, box in enumerate(spans):
        expected = torch.zeros(64)
        for bb, be in box:
            hits = [t for t, (s, e) in enumerate(enc.offsets[0]) if e > s and s < be and bb < e]
            expected[min(hits) : max(hits) + 1] = 1
        assert torch.equal(pm[j], expected), phrases[j] if j < 3 else "two spans"
    norm = positive_map_from_spans(enc, spans)
    assert torch.allclose(norm.sum(-1), torch.ones(4))
    assert torch.allclose(norm * pm.sum(-1, keepdim=True), pm)


def test_positive_map_skips_truncated_spans_and_fuzzy_ends(bpe: ByteBPETokenizer) -> None:
    caption = "red circle " + "and square " * 20 + "blue cross"
    enc = bpe([caption], max_length=8)
    b = caption.index("blue")
    pm = positive_map_from_spans(enc, [[(b, b + 10)], [(0, 3)], [(3, 4)]])
    assert pm[0].sum() == 0  # truncated away → all-zero row
    assert pm[1].sum() == 1  # "red"
    assert pm[2].sum() == 0  # a lone space has no token even with the +1/+2 and -2/-3 retries
    # A span starting on the space before a word still finds the word (b + 1 retry).
    enc2 = bpe(["red circle"], max_length=8)
    pm2 = positive_map_from_spans(enc2, [[(3, 10)]], normalize=False)
    assert pm2[0].sum() >= 1 and pm2[0, 1] == 0


def test_load_tokenizer_from_a_world_root(tiny_world: Path, tokenizer: ByteBPETokenizer) -> None:
    loaded = load_tokenizer(tiny_world)  # the world's tokenizer.json is ours, not a Hugging Face file
    assert isinstance(loaded, ByteBPETokenizer) and loaded.merges == tokenizer.merges


def test_fuzz_parity_with_transformers_on_random_ascii(bpe: ByteBPETokenizer, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    hf = load_tokenizer(bpe.save_pretrained(tmp_path / "hf"))
    rng = random.Random(0)
    alphabet = "abcdeflrst ABC 0123 .,;:!?'-_()[] \t\n  's 're"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(200)]
    texts += ["it's they're we've I'm you'll he'd", "x  y   z", "trailing   ", "\n\nnew\nlines\n"]
    ours, theirs = bpe(texts, max_length=96), hf(texts, max_length=96)
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours.attention_mask, theirs.attention_mask)
    mismatched = [i for i in range(len(texts)) if ours.offsets[i] != theirs.offsets[i]]
    assert not mismatched, [(texts[i], ours.offsets[i][:8], theirs.offsets[i][:8]) for i in mismatched[:2]]


FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer-v1"


def test_a_tokenizer_written_by_the_pure_python_implementation_gives_the_same_ids() -> None:
    # tests/fixtures/tokenizer-v1: tokenizer.json was trained and saved, and expected.json encoded, by the
    # pure-Python ByteBPETokenizer that preceded the `tokenizers` backend (commit 0034322).
    expected = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
    tok = load_tokenizer(FIXTURE / "tokenizer.json")
    assert isinstance(tok, ByteBPETokenizer) and tok.vocab_size == 400
    enc = tok(expected["texts"], max_length=expected["max_length"], padding="longest")
    assert enc.input_ids.tolist() == expected["input_ids"]
    assert enc.attention_mask.int().tolist() == expected["attention_mask"]
    assert [[list(o) for o in row] for row in enc.offsets] == expected["offsets"]
    assert [tok.decode(row) for row in expected["input_ids"]] == expected["decoded"]


def test_training_is_reproducible_across_processes_and_trainer_threads(bpe: ByteBPETokenizer) -> None:
    # The synthetic world's tokenizer must not depend on the process (hash seeds) or on the trainer's threads.
    code = (
        "import json, sys; from fiber_data import ByteBPETokenizer; "
        "corpus = json.loads(sys.stdin.read()); "
        "print(json.dumps(ByteBPETokenizer.train(corpus, 420).merges))"
    )
    # `bpe` was trained here; train again in a process with another hash seed and the trainer's threads on.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "PYTHONHASHSEED": "7", "RAYON_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(CORPUS), env=env, capture_output=True, text=True, check=True
    )
    assert [tuple(m) for m in json.loads(out.stdout)] == list(bpe.merges)

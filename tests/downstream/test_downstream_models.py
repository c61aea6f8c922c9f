"""Downstream models on a tiny random backbone: re-ranking, NLVR2 two-pass, caption decoder, initialisation."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch

from fiber_backbones import FiberBackbone, TextInputs, create_backbone, save_pretrained
from fiber_backbones.text_encoder import TextLayer
from fiber_train.checkpoint import save_weights
from fiber_train.tasks.caption import CaptionModel, CaptionSettings, CiderReward, normalize_for_reward
from fiber_train.tasks.coarse import CoarseModel
from fiber_train.tasks.downstream_common import load_pretrained_into
from fiber_train.tasks.nlvr2 import NLVR2Model
from fiber_train.tasks.retrieval import RetrievalModel, rerank_candidates, reranked_scores
from fiber_train.tasks.vqa import VQAModel

VOCAB = 300
H = 32


def backbone():
    return create_backbone("fiber-tiny", text={"vocab_size": VOCAB})


def text_batch(b: int, length: int = 8, seed: int = 0) -> TextInputs:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB - 1, (b, length), generator=gen)
    ids[:, 0] = 0
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, -2:] = False
    ids[0, -2:] = 1
    return TextInputs(ids, mask)


# --------------------------------------------------------------------------------------------- re-ranking


def test_rerank_candidates_is_the_union_of_both_top_k() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.3, 0.8, 0.7, 0.0], [0.2, 0.6, 0.1, 0.4]])
    chosen = rerank_candidates(sim, 1)
    expected = torch.zeros_like(chosen)
    expected[0, 0] = expected[1, 1] = expected[2, 1] = True  # per image (row) best text
    expected[0, 0] = expected[1, 1] = expected[1, 2] = expected[2, 3] = True  # per text (column) best image
    assert torch.equal(chosen, expected)
    assert rerank_candidates(sim, 0).all() and rerank_candidates(sim, 4).all()


def test_reranked_scores_small_k_scores_only_candidates_and_keeps_itc_order_below() -> None:
    gen = torch.Generator().manual_seed(0)
    sim = torch.rand(6, 10, generator=gen)
    fused = torch.randn(6, 10, generator=gen)
    calls: list[tuple[int, int]] = []

    def score_pairs(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        assert rows.numel() <= 4
        calls.extend(zip(rows.tolist(), cols.tolist()))
        return fused[rows, cols]

    scores, n = reranked_scores(sim, 2, score_pairs, batch_size=4)
    chosen = rerank_candidates(sim, 2)
    assert sorted(calls) == sorted(map(tuple, torch.nonzero(chosen).tolist())) and n == len(calls)
    assert len(set(calls)) == len(calls)  # every candidate pair scored once
    assert [r for r, _ in calls] == sorted(r for r, _ in calls)  # grouped by image
    assert torch.equal(scores[chosen], fused[chosen])
    assert scores[~chosen].max() < scores[chosen].min()
    # outside the candidates the ITC order is kept
    order_rest = torch.argsort(scores[~chosen])
    assert torch.equal(order_rest, torch.argsort(sim[~chosen]))


@pytest.mark.slow
def test_rerank_with_all_pairs_equals_brute_force_itm() -> None:
    model = RetrievalModel(backbone(), H, H, objective="itm").eval()
    pixels = torch.randn(3, 3, 64, 64)
    text = text_batch(5)
    with torch.no_grad():
        sim = model.embed_images(pixels) @ model.embed_texts(text).t()
        brute = torch.stack(
            [model.itm_scores(pixels[i : i + 1].expand(5, -1, -1, -1), text) for i in range(3)]
        )  # [3, 5], one fused forward per pair

        def score_pairs(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            return model.itm_scores(pixels[rows], text.index_select(cols))

        scores, n = reranked_scores(sim, 0, score_pairs, batch_size=4)
    assert n == 15
    torch.testing.assert_close(scores, brute, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ NLVR2


def test_nlvr2_single_call_equals_two_separate_fused_passes() -> None:
    model = NLVR2Model(backbone(), H).eval()
    pixels = torch.randn(2, 2, 3, 64, 64)
    text = text_batch(2)
    with torch.no_grad():
        pair = model.pair_cls(pixels, text)
        cls0 = model.projection(model.backbone(pixels[:, 0], text, fuse=True)).cls
        cls1 = model.projection(model.backbone(pixels[:, 1], text, fuse=True)).cls
    assert pair.shape == (2, 4 * H)
    torch.testing.assert_close(pair, torch.cat([cls0, cls1], dim=1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 2, 3, H, W\]"):
        model.pair_cls(pixels[:, 0], text)


# ---------------------------------------------------------------------------------------------- caption


def caption_model() -> CaptionModel:
    special = {"bos": 0, "pad": 1, "eos": 2, "mask": VOCAB - 1}
    return CaptionModel(backbone(), H, VOCAB, special, CaptionSettings(max_decode_len=6, beam_size=3)).eval()


def test_caption_decoder_is_causal_and_uses_the_image() -> None:
    model = caption_model()
    # make the cross-attention count: open the gates of the fused text layers
    with torch.no_grad():
        for layer in cast(FiberBackbone, model.backbone).text_encoder.layers:
            if getattr(layer, "crossattention_t2i", None) is not None:
                cast(TextLayer, layer).alpha_t2i.fill_(1.0)
    text = text_batch(2)
    memory = model.image_memory(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        logits = model.decode_logits(text.input_ids, text.attention_mask, memory)
        changed = text.input_ids.clone()
        changed[:, 5] = 7
        logits2 = model.decode_logits(changed, text.attention_mask, memory)
        other = model.decode_logits(text.input_ids, text.attention_mask, memory.flip(0))
    assert logits.shape == (2, 8, VOCAB)
    torch.testing.assert_close(logits[:, :5], logits2[:, :5])  # a later token never changes earlier logits
    assert not torch.allclose(logits[:, 5:], logits2[:, 5:])
    assert not torch.allclose(logits, other)  # the image matters
    # adapters: the tiny schedule fuses text layer 1 with stage 2 (128-d) and layers 2-3 with stage 3 (256-d)
    assert model.cross_layers == (1, 2, 3)
    assert model.cross_modal_att_layers.out_dims == {1: 128}


def test_caption_step_matches_teacher_forcing_and_generate_decodes() -> None:
    model = caption_model()
    memory = model.image_memory(torch.randn(2, 3, 64, 64))
    tokens = torch.tensor([[0, 5, 9], [0, 8, 8]])
    with torch.no_grad():
        step_logits = model.step_fn(memory)(tokens, torch.tensor([1, 0]))
        full = model.decode_logits(tokens, torch.ones_like(tokens, dtype=torch.bool), memory.flip(0))[:, -1]
    torch.testing.assert_close(step_logits, full)
    out = model.generate(torch.randn(2, 3, 64, 64))
    assert out.shape[0] == 2 and out.shape[1] <= 6 and torch.all(out[:, 0] == 0)
    assert not (out == VOCAB - 1).any()  # <mask> is banned


def test_cider_reward_prefers_the_reference_caption() -> None:
    refs = {1: ["a red circle on the left.", "a red disk at the left."], 2: ["two blue squares.", "blue blocks."]}
    reward = CiderReward(refs)
    r = reward([1, 1, 2], ["a red circle on the left.", "two blue squares", "two blue squares."])
    assert r[0] > r[1] and r[2] > r[1]
    assert normalize_for_reward("  a dog.. ") == "a dog. <eos>"


# ------------------------------------------------------------------------------------------ initialisation


@pytest.mark.slow
def test_downstream_models_load_a_coarse_export_and_report_fresh_keys(tmp_path: Path) -> None:
    torch.manual_seed(1)
    coarse = CoarseModel(backbone(), vocab_size=VOCAB, hidden_dim=H, itc_dim=H, loss_weights={"itc": 1.0}, queue_size=8)
    source, projection, itc = cast(FiberBackbone, coarse.backbone), coarse.projection, coarse.itc
    export = tmp_path / "model"  # the layout of CoarsePretrainTask.export
    save_pretrained(source, export / "backbone")
    save_weights(
        {k: v for k, v in coarse.state_dict().items() if not k.startswith("backbone.")}, export / "heads.safetensors"
    )

    vqa = VQAModel(backbone(), H, num_answers=7)
    report = load_pretrained_into(vqa, export)
    for k, v in source.state_dict().items():
        assert torch.equal(cast(FiberBackbone, vqa.backbone).state_dict()[k], v), k
    assert torch.equal(vqa.projection.cross_modal_text_transform.weight, projection.cross_modal_text_transform.weight)
    assert set(report.fresh) == {k for k in vqa.state_dict() if k.startswith("vqa_classifier.")}
    assert any(k.startswith("mlm_score.") for k in report.unused) and not any("queue" in k for k in report.unused)

    retrieval = RetrievalModel(backbone(), H, H)
    report = load_pretrained_into(retrieval, export)
    assert report.fresh == [] and torch.equal(retrieval.itc.temp, itc.temp)

    # another answer vocabulary: the classifier is skipped (shape mismatch) and stays fresh
    save_weights(
        {k: v for k, v in vqa.state_dict().items() if not k.startswith("backbone.")}, export / "heads.safetensors"
    )
    report = load_pretrained_into(VQAModel(backbone(), H, num_answers=9), export)
    assert any(k.startswith("vqa_classifier.3.weight") for k in report.shape_mismatch)
    assert "vqa_classifier.3.weight" in report.fresh and "vqa_classifier.0.weight" not in report.fresh
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        load_pretrained_into(vqa, tmp_path / "nowhere")

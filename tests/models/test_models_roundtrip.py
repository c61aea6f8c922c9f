"""Every model type: a few training steps, save_pretrained -> from_pretrained -> bit-identical outputs; a second
round trip; the pipelines on the loaded models. Tiny random models, seconds each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import fiber_models
from fiber_backbones import TextInputs, create_backbone
from fiber_data import ByteBPETokenizer
from fiber_models import (
    CaptionModel,
    CaptionSettings,
    CoarseModel,
    GroundingHeadConfig,
    GroundingModel,
    ModelFormatError,
    NLVR2Model,
    Preprocessing,
    RetrievalIndex,
    RetrievalModel,
    VQAModel,
    pipeline,
)

SMALL = {
    "swin": {"embed_dim": 8, "num_heads": [1, 1, 1, 1]},
    "text": {"hidden_size": 16, "intermediate_size": 32, "num_heads": 1},
}
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "two red circles", "a small blue square"]
H = 16


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    ByteBPETokenizer.train(CAPTIONS * 4, 270).save(path)
    return path


def _backbone(vocab: int, variant: str = "coarse"):
    return create_backbone("fiber-tiny", variant=variant, **{**SMALL, "text": {**SMALL["text"], "vocab_size": vocab}})


def _build(kind: str, vocab: int):
    if kind == "coarse":
        return CoarseModel(_backbone(vocab), vocab, H, H, {"itc": 1.0, "itm": 1.0, "mlm": 1.0})
    if kind == "vqa":
        m = VQAModel(_backbone(vocab), H, 3)
        m.answers = ("yes", "no", "red")
        return m
    if kind == "nlvr2":
        return NLVR2Model(_backbone(vocab), H)
    if kind == "retrieval":
        return RetrievalModel(_backbone(vocab), H, H, objective="itm")
    if kind == "caption":
        special = {"bos": 0, "eos": 2, "pad": 1, "mask": vocab - 1}
        return CaptionModel(_backbone(vocab), H, vocab, special, CaptionSettings(beam_size=2, max_decode_len=6))
    head = GroundingHeadConfig(channels=16, num_groups=8, num_convs=1, anchor_sizes=(32.0, 64.0, 128.0, 256.0, 512.0))
    return GroundingModel.from_config(_backbone(vocab, "fine_v2"), head)


def _inputs(tok, b: int = 2):
    gen = torch.Generator().manual_seed(3)
    enc = tok(CAPTIONS[:b], max_length=12)
    return torch.randn(b, 3, 64, 64, generator=gen), TextInputs(enc.input_ids, enc.attention_mask)


def _outputs(kind: str, model, tok) -> list[torch.Tensor]:
    """Inference outputs of each model type (what the pipelines call)."""
    pixels, text = _inputs(tok)
    if kind in ("coarse", "retrieval"):
        return [model.embed_images(pixels), model.embed_texts(text), model.itm_scores(pixels, text)]
    if kind == "vqa":
        return [model.answer_logits(pixels, text)]
    if kind == "nlvr2":
        return [model.nlvr2_classifier.logits(model.pair_cls(torch.stack([pixels, pixels.flip(0)], 1), text))]
    if kind == "caption":
        memory = model.image_memory(pixels)
        return [model.decode_logits(text.input_ids, text.attention_mask, memory), model.generate(pixels)]
    pyramid, hidden, _ = model.features(pixels, text)
    return [*pyramid, hidden]


def _train_a_few_steps(kind: str, model, tok) -> None:
    """Three Adam steps on a proxy loss over the inference outputs: every weight moves off its initialisation."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        loss = sum(
            (o.float().pow(2).mean() for o in _outputs(kind, model, tok) if o.is_floating_point()), torch.zeros(())
        )
        loss.backward()
        opt.step()
    model.eval()


KINDS = ["coarse", "vqa", "nlvr2", "retrieval", "caption", "grounding"]


@pytest.mark.parametrize("kind", KINDS)
def test_train_save_load_is_bit_identical_for_every_model_type(kind: str, tok_file: Path, tmp_path: Path) -> None:
    from fiber_data import load_tokenizer

    tok = load_tokenizer(tok_file)
    torch.manual_seed(0)
    model = _build(kind, tok.vocab_size)
    _train_a_few_steps(kind, model, tok)
    with torch.no_grad():
        before = _outputs(kind, model, tok)
    pre = Preprocessing(image_size=64, max_text_len=12, resize="shorter_side" if kind == "grounding" else "square")
    saved = model.save_pretrained(tmp_path / "a", tokenizer=tok_file, preprocessing=pre, info={"task": kind})
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == model.model_type and config["format_version"] == 1
    assert (saved / "tokenizer.json").read_bytes() == tok_file.read_bytes()

    loaded = fiber_models.load(saved)
    assert type(loaded) is type(model) and loaded.get_config() == model.get_config()
    with torch.no_grad():
        after = _outputs(kind, loaded, tok)
    for x, y in zip(before, after, strict=True):
        assert torch.equal(x, y)
    # second round trip from the loaded model: same bytes of weights, same config
    again = type(model).from_pretrained(loaded.save_pretrained(tmp_path / "b"))
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["head"] == config["head"]
    assert again.preprocessing == pre and again.info == {"task": kind}


def test_strict_loading_names_the_missing_tensor(tok_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = _build("vqa", 270)
    model.save_pretrained(tmp_path / "m", tokenizer=tok_file)
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    del state["vqa_classifier.3.weight"]
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ModelFormatError, match=r"missing \(1\): vqa_classifier\.3\.weight"):
        VQAModel.from_pretrained(tmp_path / "m")
    loose = VQAModel.from_pretrained(tmp_path / "m", strict=False)
    assert loose.fresh_keys == ["vqa_classifier.3.weight"]
    with pytest.raises(ModelFormatError, match="holds a 'vqa' model, not 'coarse'"):
        CoarseModel.from_pretrained(tmp_path / "m")


def test_from_pretrained_casts_dtype(tok_file: Path, tmp_path: Path) -> None:
    model = _build("nlvr2", 270)
    loaded = NLVR2Model.from_pretrained(model.save_pretrained(tmp_path / "m"), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------ pipelines


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    out = []
    for i, color in enumerate(["red", "blue", "green"]):
        path = folder / f"{i}.png"
        Image.new("RGB", (48 + 16 * i, 64), color).save(path)
        out.append(path)
    return out


def _saved(kind: str, tok_file: Path, root: Path) -> Path:
    torch.manual_seed(0)
    model = _build(kind, 270)
    pre = Preprocessing(image_size=64, max_text_len=12)
    if kind == "grounding":
        pre = Preprocessing(resize="shorter_side", test_size=64, max_size=96, max_text_len=16)
    return model.save_pretrained(root / kind, tokenizer=tok_file, preprocessing=pre)


def test_scoring_and_feature_pipelines_match_the_model(tok_file: Path, tmp_path: Path, images: list[Path]) -> None:
    path = _saved("coarse", tok_file, tmp_path)
    scoring = pipeline("image-text-scoring", path, batch_size=2)
    scores = scoring([str(p) for p in images], CAPTIONS[:3])
    features = pipeline("feature-extraction", path)
    img, txt = features(images=[str(p) for p in images]), features(texts=CAPTIONS[:3])
    assert img.shape == (3, H) and txt.shape == (3, H)
    assert [s.itc for s in scores] == pytest.approx((img * txt).sum(-1).tolist(), abs=1e-5)
    # the ITM probability is the softmax of the model's own logits for the processor's batch
    m = scoring.model
    b = scoring.processor(images=[str(p) for p in images], text=CAPTIONS[:3])
    with torch.no_grad():
        logits = m.itm_score.logits(m.projection(m.backbone(b.pixel_values, b.text, fuse=True)).cls)
    assert [s.itm for s in scores] == pytest.approx(logits.softmax(-1)[:, 1].tolist(), abs=1e-6)


def test_retrieval_index_saves_queries_and_reranks(tok_file: Path, tmp_path: Path, images: list[Path]) -> None:
    path = _saved("retrieval", tok_file, tmp_path)
    index = RetrievalIndex(path).add_folder(images[0].parent)
    index.save(tmp_path / "index")
    again = RetrievalIndex(path).load(tmp_path / "index")
    assert again.paths == [str(p) for p in images] and torch.equal(again.embeddings, index.embeddings)
    hits = again.search("a red circle", top_k=2)
    q = again.features.texts(["a red circle"])[0]
    expected = torch.topk(index.embeddings @ q, 2).indices.tolist()
    assert [h.path for h in hits] == [index.paths[i] for i in expected]
    reranked = again.search("a red circle", top_k=3, rerank=True)
    assert sorted(h.path for h in reranked) == sorted(index.paths)
    itms = [h.itm for h in reranked if h.itm is not None]
    assert len(itms) == len(reranked) and itms == sorted(itms, reverse=True)


def test_vqa_and_caption_pipelines(tok_file: Path, tmp_path: Path, images: list[Path]) -> None:
    vqa = pipeline("vqa", _saved("vqa", tok_file, tmp_path))
    answers = vqa([str(p) for p in images], ["what color?"] * 3, top_k=2)
    assert len(answers) == 3 and all(len(a) == 2 for a in answers)
    assert all(a[0][1] >= a[1][1] and a[0][0] in ("yes", "no", "red") for a in answers)
    captioner = pipeline("captioning", _saved("caption", tok_file, tmp_path), batch_size=2)
    caps = captioner([Image.open(p) for p in images])
    m = captioner.model
    with torch.no_grad():
        tokens = m.generate(captioner.processor(images=[str(images[2])]).pixel_values)
    assert len(caps) == 3 and caps[2] == captioner.processor.decode(tokens[0])


def test_grounding_pipelines_give_boxes_in_original_pixels(tok_file: Path, tmp_path: Path, images: list[Path]) -> None:
    from fiber_heads.grounding import PostprocessConfig

    path = _saved("grounding", tok_file, tmp_path)
    keep_all = PostprocessConfig(pre_nms_thresh=0.0, pre_nms_top_n=20, detections_per_img=10)
    det = pipeline("zero-shot-detection", path, postprocess=keep_all)
    preds = det([str(p) for p in images], ["red circle", "blue square"])
    for p, pred in zip(images, preds):
        w, h = Image.open(p).size
        assert pred.image_size == (h, w) and len(pred) > 0
        assert (pred.boxes[:, 2] <= w + 1).all() and (pred.boxes[:, 3] <= h + 1).all()
        assert set(pred.phrases) <= {"red circle", "blue square"}
    ref = pipeline("referring-expression", path, postprocess=keep_all)
    (one,) = ref([str(images[0])], ["the red circle"])
    assert len(one) == 1
    grounded = pipeline("phrase-grounding", path, postprocess=keep_all)([str(images[0])], ["the red circle"])[0]
    assert torch.equal(one.boxes[0], grounded.boxes[0])

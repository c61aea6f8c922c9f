"""`fiber-train finetune refexp | grounding | detection` (docs/reference/training.md §4): runs end to end, the metrics against
independent computations, zero-shot evaluation, prompts, few-shot subsets, LVIS chunking, selection state."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision.ops import generalized_box_iou

from fiber_data import DetectionGroundingDataset, GroundingTransform, Prompt
from fiber_train.cli import main
from fiber_train.config import load_config
from fiber_train.predictor import GroundingPredictor
from fiber_train.tasks import TASKS
from fiber_train.tasks.grounding_common import GroundingLRScheduler, ScheduleSettings
from fiber_train.tasks.grounding_eval import detection_metrics, phrase_grounding_metrics, refexp_metrics
from fiber_train.tasks.grounding_finetune import DetectionFinetuneTask, GroundingFinetuneConfig, RefExpTask

pytestmark = pytest.mark.integration


def _run(task: str, out: Path, name: str, world: Path, tiny: list[str], *extra: str) -> tuple[Path, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):  # messages are logged on stderr
        code = main(
            ["finetune", task, "--out", str(out), "--run-name", name, "--set", f"data.root={world}", *tiny, *extra]
        )
    assert code == 0, buf.getvalue()
    return out / name, buf.getvalue()


def _config(world: Path, tiny: list[str], task: str, *extra: str) -> GroundingFinetuneConfig:
    return load_config(GroundingFinetuneConfig, TASKS[task].default_recipe, [f"data.root={world}", *tiny, *extra])


# ----------------------------------------------------------------------------------------------- end to end


def test_refexp_run_and_accuracy_recomputed_by_hand(fine_world: Path, fine_tiny: list[str], tmp_path: Path) -> None:
    run, stdout = _run("refexp", tmp_path, "rec", fine_world, fine_tiny)
    metrics = json.loads((run / "eval.json").read_text())
    ann = json.loads((fine_world / "annotations" / "refexp_val.json").read_text())
    assert metrics["num_expressions"] == len(ann["images"]) > 0
    assert "refexp on val: giou/all/P@1" in stdout
    # the same accuracy from the exported model, the predictor and torchvision's GIoU, without fiber-eval
    predictor = GroundingPredictor.from_run(run, postprocess=None)
    predictor.postprocess = TASKS["refexp"].task(_config(fine_world, fine_tiny, "refexp")).postprocess()
    boxes = {a["image_id"]: a for a in ann["annotations"]}
    hits = []
    for im in ann["images"]:
        a = boxes[im["id"]]
        (s, e) = a["tokens_positive"][0]
        pred = predictor.predict(
            [fine_world / "images" / "val" / im["file_name"]], [Prompt(im["caption"], (0,), {0: (s, e)})]
        )[0]
        x, y, w, h = a["bbox"]
        gt = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float64)
        top = pred.boxes[:1].double()
        hits.append(bool(len(top)) and float(generalized_box_iou(gt, top)[0, 0]) >= 0.5)
    assert metrics["giou/all/P@1"] == pytest.approx(100.0 * np.mean(hits))
    assert metrics["best/giou/all/P@1"] == metrics["giou/all/P@1"]
    assert json.loads((run / "model" / "config.json").read_text())["info"]["task"] == "refexp"


def test_detection_zero_shot_equals_the_fine_runs_own_ap(
    fine_run: tuple[Path, str], fine_world: Path, fine_tiny: list[str], tmp_path: Path
) -> None:
    fine_dir, _ = fine_run
    run, _ = _run(
        "detection",
        tmp_path,
        "zs",
        fine_world,
        fine_tiny,
        f"model.pretrained={fine_dir}",
        "trainer.max_steps=0",
        "data.eval_split=test",
    )
    zero_shot = json.loads((run / "eval.json").read_text())
    own = json.loads((fine_dir / "eval.json").read_text())
    assert zero_shot["step"] == 0 and zero_shot["num_images"] == own["num_images"] == 6
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75"):
        assert zero_shot[key] == pytest.approx(own[key], abs=1e-9), key


def test_grounding_run_scores_every_phrase(fine_world: Path, fine_tiny: list[str], tmp_path: Path) -> None:
    run, _ = _run("grounding", tmp_path, "g", fine_world, fine_tiny, "trainer.max_steps=2")
    metrics = json.loads((run / "eval.json").read_text())
    ann = json.loads((fine_world / "annotations" / "grounding_val.json").read_text())
    phrases = {(a["image_id"], tuple(map(tuple, a["tokens_positive"]))) for a in ann["annotations"]}
    assert metrics["num_phrases"] == len(phrases) > 0
    assert 0.0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= metrics["R@upper"] <= 100.0


# ------------------------------------------------------------------------------- metrics with a fake model


class _OraclePredictor:
    """Answers every phrase / class with boxes given by ``oracle(image_path, phrase) -> [K, 4]``."""

    def __init__(self, oracle: Any, detections_per_img: int = 100) -> None:
        self.oracle = oracle
        self.transform = GroundingTransform((64,), 1333, 0.0, train=False)
        self.postprocess = SimpleNamespace(detections_per_img=detections_per_img)
        self.calls: list[tuple[int, Any]] = []

    def predict(self, images: list[Any], queries: list[Any]) -> list[Any]:
        self.calls.append((len(images), queries[0]))
        out = []
        for path, q in zip(images, queries):
            if isinstance(q, Prompt):
                names = [q.caption[q.spans[lab][0] : q.spans[lab][1]] for lab in q.labels]
            else:
                names = list(q)
            boxes, labels = [], []
            for k, name in enumerate(names):
                b = np.asarray(self.oracle(str(path), name), dtype=np.float64).reshape(-1, 4)
                boxes.append(b)
                labels += [k] * len(b)
            b = torch.tensor(np.concatenate(boxes), dtype=torch.float32)
            lab = torch.tensor(labels, dtype=torch.long)
            scores = torch.linspace(1.0, 0.5, len(lab))
            out.append(
                SimpleNamespace(boxes=b, scores=scores, labels=lab, boxes_for=lambda k, b=b, lab=lab: b[lab == k])
            )
        return out

    def typed(self) -> GroundingPredictor:
        """This fake where the metrics expect a GroundingPredictor (it has the members they use)."""
        return cast(GroundingPredictor, self)


def test_refexp_metrics_with_an_oracle(fine_world: Path) -> None:
    ann_path = fine_world / "annotations" / "refexp_val.json"
    ann = json.loads(ann_path.read_text())
    by_file = {}
    for im, a in zip(ann["images"], sorted(ann["annotations"], key=lambda a: a["image_id"])):
        x, y, w, h = a["bbox"]
        by_file[(im["file_name"], im["caption"][slice(*a["tokens_positive"][0])])] = [x, y, x + w, y + h]
    perfect = _OraclePredictor(lambda path, phrase: by_file[(Path(path).name, phrase)])
    m = refexp_metrics(perfect.typed(), ann_path, fine_world / "images" / "val")
    assert m["giou/all/P@1"] == 100.0 and m["num_expressions"] == len(ann["images"])

    def _away(box: list[float]) -> list[float]:  # moved by its width + 2 toward the side with room: IoU 0, in the image
        dx = box[2] - box[0] + 2
        return list(np.add(box, [dx, 0, dx, 0] if box[2] + dx <= 64 else [-dx, 0, -dx, 0]))

    shifted = _OraclePredictor(lambda path, phrase: _away(by_file[(Path(path).name, phrase)]))
    assert refexp_metrics(shifted.typed(), ann_path, fine_world / "images" / "val")["giou/all/P@1"] == 0.0


_XML = """<annotation><filename>{id}.jpg</filename><size><width>60</width><height>40</height><depth>3</depth></size>
<object><name>1</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>
<object><name>2</name><bndbox><xmin>30</xmin><ymin>5</ymin><xmax>50</xmax><ymax>35</ymax></bndbox></object>
<object><name>2</name><bndbox><xmin>40</xmin><ymin>4</ymin><xmax>58</xmax><ymax>24</ymax></bndbox></object>
<object><name>3</name><nobndbox>1</nobndbox><scene>1</scene></object></annotation>
"""
_SENTENCES = (
    "[/EN#1/people A dog] chases [/EN#2/other two balls] on [/EN#3/scene the lawn] .\n[/EN#2/other Balls] fly .\n"
)
_TRUTH = {"A dog": [[2, 3, 20, 30]], "two balls": [[40, 4, 58, 24]], "Balls": [[30, 5, 50, 35]]}


def test_flickr_raw_phrase_grounding_with_an_oracle(tmp_path: Path) -> None:
    root = tmp_path / "entities"
    for sub in ("Annotations", "Sentences", "images"):
        (root / sub).mkdir(parents=True)
    for image_id in ("11", "22"):
        (root / "Annotations" / f"{image_id}.xml").write_text(_XML.format(id=image_id))
        (root / "Sentences" / f"{image_id}.txt").write_text(_SENTENCES)
        Image.new("RGB", (60, 40)).save(root / "images" / f"{image_id}.jpg")
    (root / "val.txt").write_text("11\n22\n")
    oracle = _OraclePredictor(lambda path, phrase: _TRUTH[phrase])
    m = phrase_grounding_metrics(oracle.typed(), ann=root, images=root / "images", split="val", source="flickr")
    # 3 evaluated phrases per image ("the lawn" has no box); each answered with one box of its entity (ANY-box)
    assert m["num_phrases"] == 6 and m["R@1"] == 100.0
    swapped = _OraclePredictor(lambda path, phrase: _TRUTH["A dog" if phrase != "A dog" else "Balls"])
    assert (
        phrase_grounding_metrics(swapped.typed(), ann=root, images=root / "images", split="val", source="flickr")["R@1"]
        == 0.0
    )


def _gt_boxes(ds: DetectionGroundingDataset, continuous: bool) -> dict[tuple[str, str], np.ndarray]:
    out: dict[tuple[str, str], list] = {}
    for i in range(len(ds)):
        lo, hi = ds.offsets[i], ds.offsets[i + 1]
        for box, lab in zip(ds.boxes[lo:hi], ds.labels[lo:hi]):
            b = box + (np.array([0, 0, 1, 1]) if continuous else 0)  # the dataset's boxes are "+1" xyxy
            out.setdefault((ds.image_paths[i], ds.label_names[int(lab)]), []).append(b)
    return {k: np.asarray(v) for k, v in out.items()}


def test_detection_metrics_coco_and_lvis_label_mapping_with_an_oracle(fine_world: Path, tmp_path: Path) -> None:
    pytest.importorskip("lvis")
    ann = fine_world / "annotations" / "instances_test.json"
    images = fine_world / "images" / "test"
    ds = DetectionGroundingDataset(ann, images, GroundingTransform((64,), 1333, 0.0, train=False))
    plus_one, continuous = _gt_boxes(ds, False), _gt_boxes(ds, True)
    coco = detection_metrics(_OraclePredictor(lambda p, n: plus_one.get((p, n), np.zeros((0, 4)))).typed(), ann, images)
    assert coco["bbox/AP"] == pytest.approx(100.0) and coco["num_classes"] == 40
    # the same world as an LVIS file: category ids are not 1..K, so labels must be mapped to the ids
    data = json.loads(ann.read_text())
    remap = {c["id"]: 1000 + 7 * c["id"] for c in data["categories"]}
    for c in data["categories"]:
        c.update(id=remap[c["id"]], frequency="f")
    for a in data["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    for im in data["images"]:
        im.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    lvis_file = tmp_path / "lvis.json"
    lvis_file.write_text(json.dumps(data))
    oracle = _OraclePredictor(lambda p, n: continuous.get((p, n), np.zeros((0, 4))))
    lvis = detection_metrics(oracle.typed(), lvis_file, images, protocol="lvis")
    assert lvis["bbox/AP"] == pytest.approx(100.0)


def test_predictor_chunks_class_lists_for_lvis(fine_run: tuple[Path, str], fine_world: Path) -> None:
    run, _ = fine_run
    predictor = GroundingPredictor.from_run(run, classes_per_prompt=3)
    seen: list[torch.Tensor] = []
    original = predictor.model.predict

    def spy(pixels: torch.Tensor, text: Any, positive: torch.Tensor, *args: Any) -> Any:
        seen.append(positive)
        return original(pixels, text, positive, *args)

    cast(Any, predictor.model).predict = spy  # an instance attribute shadows the method
    names = [
        "red circle",
        "blue square",
        "green cross",
        "white diamond",
        "black triangle",
        "orange circle",
        "red cross",
    ]
    images = sorted((fine_world / "images" / "test").iterdir())[:2]
    preds = predictor.detect(images, names)
    positive = seen[0]
    assert positive.shape[:2] == (2 * 3, 7)  # 2 images x 3 prompts (3 + 3 + 1 names), 7 class columns
    per_row = (positive.sum(-1) > 0).int()
    assert per_row[:3].sum(0).tolist() == [1] * 7  # every class in exactly one prompt of an image
    assert [int(r.sum()) for r in per_row[:3]] == [3, 3, 1]
    for p in preds:
        assert set(p.phrases) <= set(names) and p.label_names == tuple(names)


# ---------------------------------------------------------------------------------------- data and prompts


def test_detection_prompt_modes(fine_world: Path, fine_tiny: list[str]) -> None:
    ordered = DetectionFinetuneTask(
        _config(
            fine_world,
            fine_tiny,
            "detection",
            "data.prompts.train=ordered",
            'data.prompts.names={"red circle": "scarlet disc"}',
            'data.prompts.suffixes={"red circle": " seen from above"}',
        )
    ).train_dataset()
    ordered = cast(DetectionGroundingDataset, ordered)
    sample = ordered[0]
    assert sample.caption.startswith("scarlet disc seen from above. ")
    assert sample.caption.count(". ") == 39
    for (span,), box_label in zip(sample.tokens_positive, sample.labels.tolist()):
        name = ordered.label_names[box_label]
        assert sample.caption[span[0] : span[1]] == ("scarlet disc" if name == "red circle" else name)
    shuffled = DetectionFinetuneTask(_config(fine_world, fine_tiny, "detection")).train_dataset()
    captions = {shuffled[i].caption for i in range(4)}
    assert len(captions) > 1 and all(c.count(". ") == 39 for c in captions)  # every class, orders differ
    sampled = DetectionFinetuneTask(
        _config(fine_world, fine_tiny, "detection", "data.prompts.train=sampled", "data.prompts.max_negatives=3")
    ).train_dataset()
    sampled = cast(DetectionGroundingDataset, sampled)
    s = sampled[1]
    present = {sampled.label_names[int(k)] for k in sampled.labels_of(1)}
    assert present <= set(s.caption.split(". ")) and len(s.caption.split(". ")) <= len(present) + 3


def test_few_shot_subset(fine_world: Path, fine_tiny: list[str]) -> None:
    task = DetectionFinetuneTask(
        _config(fine_world, fine_tiny, "detection", "data.few_shot=1", "data.few_shot_copies=3")
    )
    subset = cast(Subset, task.train_dataset())
    full = cast(DetectionGroundingDataset, subset.dataset)
    chosen = sorted(set(subset.indices))
    assert len(subset) == 3 * len(chosen) < 3 * len(full)
    counts = {lab: 0 for lab in full.label_names}
    totals = dict(counts)
    for i in range(len(full)):
        for lab in full.labels_of(i).tolist():
            totals[lab] += 1
            if i in chosen:
                counts[lab] += 1
    assert all(counts[lab] >= min(1, totals[lab]) for lab in counts)  # every class with a box is covered
    # deterministic in the seed
    assert full.few_shot_indices(1, seed=0) == chosen and full.few_shot_indices(1, seed=1) != chosen


# ------------------------------------------------------------------------------- selection, errors, config


def test_plateau_early_stop_and_state(fine_world: Path, fine_tiny: list[str]) -> None:
    task = RefExpTask(_config(fine_world, fine_tiny, "refexp", "eval.plateau_patience=2", "eval.early_stop_patience=3"))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = task.build_scheduler(opt, 100)
    assert isinstance(sched, GroundingLRScheduler)
    lr0 = opt.param_groups[0]["lr"]
    improved = [task._track(v) for v in (1.0, 2.0, 2.0, 1.5)]
    assert improved == [True, True, False, False] and not task.should_stop()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * 0.1)  # two evaluations without improvement
    state = task.state_dict()
    again = RefExpTask(task.config)
    again.build_model()
    again.load_state_dict(state)
    assert again.best == 2.0 and again.evals_since_best == 2
    again._track(0.0)
    assert again.should_stop()


def test_scheduler_lr_scale_survives_a_resume() -> None:
    params = [torch.nn.Parameter(torch.zeros(1))]
    settings = ScheduleSettings(warmup_steps=0, milestones=(0.5,))
    a = GroundingLRScheduler(torch.optim.SGD(params, lr=1.0), settings, 10)
    a.scale_lr(0.5)
    for _ in range(6):
        a.step()
    assert a.get_last_lr() == [pytest.approx(0.05)]
    b = GroundingLRScheduler(torch.optim.SGD(params, lr=1.0), settings, 10)
    b.load_state_dict(a.state_dict())
    assert b.get_last_lr() == a.get_last_lr()


def test_early_stop_ends_the_loop(fine_world: Path, fine_tiny: list[str], tmp_path: Path) -> None:
    from fiber_train.loop import fit

    cfg = _config(
        fine_world,
        fine_tiny,
        "detection",
        "trainer.max_steps=6",
        "eval.every=1",
        "eval.early_stop_patience=2",
        "eval.start_baseline=false",  # the records below are the periodic evaluations only
    )
    task = DetectionFinetuneTask(cfg)
    values = iter([3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.0])
    task.metrics = lambda model, fabric: {"bbox/AP": next(values)}
    result = fit(task, tmp_path / "run")
    assert result.step == 3  # best at step 1, then two evaluations without improvement
    records = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 3]


def test_errors_name_the_problem(fine_world: Path, fine_tiny: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="for task 'detection' but this is `fiber-train finetune refexp`"):
        RefExpTask(_config(fine_world, fine_tiny, "detection"))
    with pytest.raises(ValueError, match="prefixes/suffixes need data.prompts.train=ordered"):
        _config(fine_world, fine_tiny, "detection", 'data.prompts.prefixes={"red circle": "a "}')
    task = DetectionFinetuneTask(
        _config(fine_world, fine_tiny, "detection", "data.prompts.train=ordered", 'data.prompts.names={"unicorn": "x"}')
    )
    with pytest.raises(ValueError, match=r"instances_train\.json: prompt names name categories .*unicorn"):
        task.train_dataset()
    missing = RefExpTask(
        _config(fine_world, fine_tiny, "refexp", "data.format=files", f"data.train_ann={tmp_path / 'nope.json'}")
    )
    with pytest.raises(FileNotFoundError, match=r"nope\.json not found\. `fiber-train finetune refexp`"):
        missing.prepare_data()


@pytest.mark.parametrize(
    ("recipe", "task", "variant", "lr", "language_lr", "wd", "ema", "flip", "freeze", "protocol"),
    [
        ("finetune/coco_fiber_b", "detection", "fine_v2", 1e-5, 1e-5, 1e-4, 0.999, 0.5, -1, "coco"),
        ("finetune/lvis_fiber_b", "detection", "fine_v2", 1e-5, 1e-5, 1e-4, 0.999, 0.5, -1, "lvis"),
        ("finetune/refcoco_fiber_b", "refexp", "fine_v3", 1e-5, 1e-5, 1e-4, 0.999, 0.0, -1, "coco"),
        ("finetune/odinw_aquarium_fiber_b", "detection", "fine_v2", 1e-4, 1e-5, 0.05, 0.0, 0.5, 2, "coco"),
    ],
)
def test_reference_recipes_follow_the_table(
    recipe: str,
    task: str,
    variant: str,
    lr: float,
    language_lr: float,
    wd: float,
    ema: float,
    flip: float,
    freeze: int,
    protocol: str,
) -> None:
    # docs/reference/training.md §4.1
    cfg = load_config(GroundingFinetuneConfig, recipe)
    assert (cfg.task, cfg.model.variant, cfg.model.freeze_level) == (task, variant, freeze)
    assert (cfg.optim.lr, cfg.optim.language_lr, cfg.optim.weight_decay, cfg.optim.ema_decay) == (
        lr,
        language_lr,
        wd,
        ema,
    )
    assert (cfg.data.flip_prob, cfg.eval.protocol, cfg.optim.wd_milestone_ratio) == (flip, protocol, 0.0)
    assert cfg.optim.bias_lr_mult == 2.0 and cfg.optim.bias_weight_decay == 0.0
    if recipe.startswith("finetune/lvis"):
        assert cfg.data.prompts.train == "sampled" and cfg.data.prompts.classes_per_prompt == 40
    if recipe.startswith("finetune/odinw"):
        assert cfg.data.prompts.train == "ordered" and cfg.eval.plateau_patience == 3
        assert cfg.eval.early_stop_patience == 8 and cfg.eval.keep_best and cfg.trainer.grad_clip == 1.0


def test_any_odinw_style_folder_with_one_command(fine_world: Path, fine_tiny: list[str], tmp_path: Path) -> None:
    # a RoboFlow-style export: {train,valid}/_annotations.coco.json with the dataset-level category id 0, images
    # next to it; caption prompts keyed by category name; no code, one command
    import shutil

    root = tmp_path / "odinw" / "Shapes"
    for split, source in (("train", "train"), ("valid", "test")):
        data = json.loads((fine_world / "annotations" / f"instances_{source}.json").read_text())
        data["categories"] = [{"id": 0, "name": "shapes", "supercategory": "none"}, *data["categories"]]
        (root / split).mkdir(parents=True)
        for im in data["images"]:
            shutil.copy(fine_world / "images" / source / im["file_name"], root / split / im["file_name"])
        (root / split / "_annotations.coco.json").write_text(json.dumps(data))
    overrides = [
        *(t for t in fine_tiny if not t.startswith("data.synthetic")),
        "model.backbone=fiber-tiny",
        "model.pretrained=null",
        "model.freeze_level=-1",
        "model.head.channels=32",
        "model.head.grad_checkpointing=false",
        f"data.tokenizer={fine_world / 'tokenizer.json'}",
        "data.train_ann={split}/_annotations.coco.json",
        "data.eval_ann={split}/_annotations.coco.json",
        'data.prompts.suffixes={"red circle": " drawn in red"}',
        "data.max_text_len=128",  # fiber-tiny has 130 positions
        "data.text_padding=longest",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.max_steps=4",
        "eval.every=2",
    ]
    args = ["finetune", "detection", "--recipe", "finetune/odinw_aquarium_fiber_b", "--data", str(root)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):  # messages are logged on stderr
        code = main([*args, "--out", str(tmp_path), "--run-name", "odinw", "--set", *overrides])
    assert code == 0, buf.getvalue()
    run, stdout = tmp_path / "odinw", buf.getvalue()
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["num_classes"] == 40 and metrics["num_images"] == 6  # background category dropped
    assert (run / "best" / "config.json").is_file()  # keep_best of the ODinW recipe
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] == [2, 4]
    assert "detection on valid:" in stdout


def test_prompt_text_chunks_to_the_token_budget() -> None:
    from fiber_train.tasks.grounding_eval import PromptText

    names = {1: "fish", 2: "jellyfish", 3: "penguin", 4: "shark"}
    text = PromptText(names={"shark": "great white shark"}, suffixes={"fish": " in the water"})
    words = lambda caption: len(caption.replace(".", " ").split())  # noqa: E731 - a token count for the test
    # entries cost "fish in the water. " = 4, "jellyfish. " = 1, "penguin. " = 1, "great white shark. " = 3
    chunks = text.chunks([1, 2, 3, 4], names, words, max_tokens=5)
    assert [c.labels for c in chunks] == [(1, 2), (3, 4)]
    assert [c.caption for c in chunks] == ["fish in the water. jellyfish", "penguin. great white shark"]
    assert chunks[1].caption[slice(*chunks[1].spans[4])] == "great white shark"
    assert chunks[0].caption[slice(*chunks[0].spans[1])] == "fish"  # the grounded span is the name only
    assert [c.labels for c in text.chunks([1, 2, 3, 4], names, words, max_tokens=100, max_labels=3)] == [
        (1, 2, 3),
        (4,),
    ]
    with pytest.raises(ValueError, match="alone needs 3 tokens > max_tokens=2"):
        text.chunks([4], names, words, max_tokens=2)


def test_the_evaluation_before_training_does_not_count_for_selection(
    fine_world: Path, fine_tiny: list[str], tmp_path: Path
) -> None:
    from fiber_train.loop import fit

    cfg = _config(
        fine_world, fine_tiny, "detection", "trainer.max_steps=6", "eval.every=1", "eval.early_stop_patience=2"
    )
    assert cfg.eval.start_baseline  # detection_tiny evaluates the untrained model first
    task = DetectionFinetuneTask(cfg)
    values = iter([9.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.0])  # the untrained model scores best (9.0)
    task.metrics = lambda model, fabric: {"bbox/AP": next(values), "bbox/AP50": 0.0}  # type: ignore[method-assign]
    result = fit(task, tmp_path / "run")
    assert result.step == 3  # selection starts at step 1 (best), then two evaluations without improvement
    assert result.metrics["baseline/bbox/AP"] == 9.0
    records = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 3]

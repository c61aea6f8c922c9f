"""VQAv2-format files of the synthetic world (§6): ``annotations/vqa_questions_{split}.json`` and
``annotations/vqa_annotations_{split}.json`` (``data_subtype`` = split; image files are
``"{split}_{image_id:06d}.png"``, read by :class:`~fiber_data.sources.vqa.VQAv2Dataset` with
``image_template=`` :data:`~fiber_data.synthetic.config.SYNTHETIC_VQA_TEMPLATE`); 10 annotator answers each."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fiber_data.synthetic.config import POSITIONS, SyntheticWorldConfig
from fiber_data.synthetic.scene import SceneObject
from fiber_data.synthetic.writer import DrawnImage, TaskWriter, write_json

if TYPE_CHECKING:
    import numpy as np

__all__ = ["VQAWriter", "vqa_questions"]


def vqa_questions(
    objects: list[SceneObject], config: SyntheticWorldConfig, rng: np.random.Generator, count: int
) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Up to ``count`` distinct ``(question, answer, answer_type, wrong answers)`` about one image."""
    shapes_present = [o.shape for o in objects]
    pool: list[tuple[str, str, str, tuple[str, ...]]] = []
    numbers = tuple(str(k) for k in range(config.min_objects, config.max_objects + 1))
    pool.append(("How many shapes are there?", str(len(objects)), "number", numbers or ("1",)))
    for obj in objects:
        if shapes_present.count(obj.shape) == 1:
            pool.append((f"What color is the {obj.shape}?", obj.color, "other", config.colors))
        pool.append((f"What shape is in the {POSITIONS[obj.cell]}?", obj.shape, "other", config.shapes))
        same = [o for o in objects if (o.color, o.shape) == (obj.color, obj.shape)]
        if len(same) == 1:
            pool.append((f"Is the {obj.color} {obj.shape} large or small?", obj.size, "other", ("large", "small")))
    present = {(o.color, o.shape) for o in objects}
    obj = objects[int(rng.integers(len(objects)))]
    if rng.random() < 0.5:
        pool.append((f"Is there a {obj.color} {obj.shape}?", "yes", "yes/no", ("yes", "no")))
    else:
        for _ in range(20):
            c = config.colors[int(rng.integers(len(config.colors)))]
            sh = config.shapes[int(rng.integers(len(config.shapes)))]
            if (c, sh) not in present:
                pool.append((f"Is there a {c} {sh}?", "no", "yes/no", ("yes", "no")))
                break
    order = rng.permutation(len(pool))[:count]
    return [pool[int(j)] for j in sorted(order)]


class VQAWriter(TaskWriter):
    """``vqa_{questions,annotations}_{split}.json``: ``vqa_questions_per_image`` questions per image (drawn with
    seed ``(seed, split, image, 1)``); one or two of the ten annotators give a wrong answer."""

    def start_split(self, split: str) -> None:
        self.questions: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add(self, image: DrawnImage) -> None:
        import numpy as np

        qrng = np.random.default_rng([self.config.seed, image.split_index, image.index, 1])
        drawn = vqa_questions(image.objects, self.config, qrng, self.config.vqa_questions_per_image)
        for k, (question, answer, answer_type, noise) in enumerate(drawn):
            qid = image.image_id * 1000 + k
            self.questions.append({"image_id": image.image_id, "question": question, "question_id": qid})
            raw = [answer] * 10
            # One or two annotators disagree, so the soft scores are not all 1.0.
            for slot in range(int(qrng.integers(0, 3))):
                raw[9 - slot] = noise[int(qrng.integers(len(noise)))]
            self.annotations.append(
                {
                    "question_id": qid,
                    "image_id": image.image_id,
                    "question_type": " ".join(question.lower().split()[:3]),
                    "answer_type": answer_type,
                    "multiple_choice_answer": answer,
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(raw)
                    ],
                }
            )

    def write_split(self, root: Path, split: str, info: dict[str, Any]) -> dict[str, int]:
        meta = {"info": info, "data_type": "synthetic", "data_subtype": split}
        ann = root / "annotations"
        write_json(
            ann / f"vqa_questions_{split}.json", {**meta, "task_type": "Open-Ended", "questions": self.questions}
        )
        write_json(ann / f"vqa_annotations_{split}.json", {**meta, "annotations": self.annotations})
        return {"vqa_questions": len(self.questions)}

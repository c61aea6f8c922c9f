"""Time to score full-size splits with fiber-eval, on synthetic predictions.

- retrieval: R@1/5/10 both ways for 5,000 images x 25,000 captions (COCO 5k test) and 1,000 x 5,000 (Flickr30k).
- detection: COCO AP through pycocotools for N images x 100 detections over 80 categories (COCO val2017 has
  5,000 images; ``--coco-images`` sets N).
- VQA: accuracy for N questions with 10 answers each (VQAv2 test-dev has ~107k questions).

``--quick`` shrinks every split. Nothing here needs torch.
"""

from __future__ import annotations

import time

import numpy as np
from _common import Recorder, base_parser, finish, setup

from fiber_eval import recall_at_k
from fiber_eval.detection import coco_bbox_eval
from fiber_eval.vqa import vqa_accuracy


def _time(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(min(times))


def _coco(n_images: int, rng: np.random.Generator) -> tuple[dict, list[dict]]:
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"})
        for _ in range(7):  # COCO averages ~7 objects per image
            x, y = rng.uniform(0, 500), rng.uniform(0, 350)
            w, h = rng.uniform(10, 140), rng.uniform(10, 130)
            c = int(rng.integers(1, 81))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": c,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            dets.append(
                {"image_id": i, "category_id": c, "bbox": [x + 3, y - 2, w, h], "score": float(rng.uniform(0.3, 1))}
            )
        for _ in range(93):
            dets.append(
                {
                    "image_id": i,
                    "category_id": int(rng.integers(1, 81)),
                    "bbox": [float(rng.uniform(0, 600)), float(rng.uniform(0, 440)), 30.0, 30.0],
                    "score": float(rng.uniform(0, 0.5)),
                }
            )
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}
    return gt, dets


def main() -> None:
    p = base_parser((__doc__ or "").split("\n")[0])
    p.add_argument("--coco-images", type=int, default=5000)
    p.add_argument("--vqa-questions", type=int, default=107394)
    args = p.parse_args()
    setup(args, repeat=(3, 1), warmup=(0, 0))
    rng = np.random.default_rng(0)
    sizes = [(100, 500)] if args.quick else [(1000, 5000), (5000, 25000)]
    coco_n = 50 if args.quick else args.coco_images
    vqa_n = 2000 if args.quick else args.vqa_questions
    rec = Recorder("eval_scoring", args, {"retrieval_sizes": sizes, "coco_images": coco_n, "vqa_questions": vqa_n})
    rows = []
    for n_img, n_txt in sizes:
        scores = rng.standard_normal((n_img, n_txt)).astype(np.float32)
        t2i = np.repeat(np.arange(n_img), n_txt // n_img)
        med, mn = _time(lambda s=scores, t=t2i: recall_at_k(s, t), args.repeat)
        rows.append({"task": f"retrieval {n_img}x{n_txt}", "median_s": med, "min_s": mn})
        rec.add(rows[-1])
    gt, dets = _coco(coco_n, rng)
    med, mn = _time(lambda: coco_bbox_eval(gt, dets), 1)
    rows.append({"task": f"coco AP {coco_n} images x 100 dets", "median_s": med, "min_s": mn})
    rec.add(rows[-1])
    words = ["yes", "no", "2", "3", "red", "blue", "circle"]
    answers = [[words[int(k)] for k in rng.integers(0, len(words), 10)] for _ in range(vqa_n)]
    preds = [words[int(k)] for k in rng.integers(0, len(words), vqa_n)]
    med, mn = _time(lambda: [vqa_accuracy(p_, a) for p_, a in zip(preds, answers)], args.repeat)
    rows.append({"task": f"vqa accuracy {vqa_n} questions", "median_s": med, "min_s": mn})
    rec.add(rows[-1])
    finish(rec, rows, ["task", "median_s", "min_s"])


if __name__ == "__main__":
    main()

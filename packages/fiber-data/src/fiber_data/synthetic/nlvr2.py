"""NLVR2-format files of the synthetic world (§8): ``nlvr2/{split}.json`` (JSON Lines) with statements about pairs of
consecutive images, and the pair images as ``nlvr2/images/{split}/<split>-0-<pair>-img0.png`` / ``-img1.png``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fiber_data.synthetic.config import SPLITS, SyntheticWorldConfig
from fiber_data.synthetic.language import NUMBERS
from fiber_data.synthetic.scene import SceneObject
from fiber_data.synthetic.writer import DrawnImage, TaskWriter

if TYPE_CHECKING:
    import numpy as np

__all__ = ["NLVR2Writer", "nlvr2_statement"]


def nlvr2_statement(
    left: list[SceneObject], right: list[SceneObject], config: SyntheticWorldConfig, rng: np.random.Generator
) -> tuple[str, bool]:
    """One statement about an image pair, true with probability 1/2 by construction."""
    want = bool(rng.random() < 0.5)
    kind = int(rng.integers(4))
    if kind == 0:
        truth = "more" if len(left) > len(right) else ("fewer" if len(left) < len(right) else "the same number of")
        others = [r for r in ("more", "fewer", "the same number of") if r != truth]
        rel = truth if want else others[int(rng.integers(2))]
        if rel == "the same number of":
            return "Both images contain the same number of shapes.", rel == truth
        return f"The left image contains {rel} shapes than the right image.", rel == truth
    if kind == 1:
        both = sorted({o.color for o in left} & {o.color for o in right})
        pool = both if want and both else [c for c in config.colors if c not in both]
        c = pool[int(rng.integers(len(pool)))]
        return f"Both images contain a {c} shape.", c in both
    if kind == 2:
        present = sorted({o.shape for o in right})
        absent = [sh for sh in config.shapes if sh not in present]
        pool = present if want or not absent else absent
        sh = pool[int(rng.integers(len(pool)))]
        return f"The right image contains a {sh}.", sh in present
    true_total = len(left) + len(right)
    total = true_total if want else true_total + (1 if rng.random() < 0.5 else -1)
    word = NUMBERS[total] if total < len(NUMBERS) else str(total)
    return f"There are {word} shapes in total.", total == true_total


class NLVR2Writer(TaskWriter):
    """``nlvr2/{split}.json``: ``nlvr2_statements_per_pair`` distinct statements per pair of consecutive images
    (drawn with seed ``(seed, split, pair, 2)``); the pair images are hard links to (else copies of) the
    split's images."""

    def start_split(self, split: str) -> None:
        self.drawn: list[DrawnImage] = []

    def add(self, image: DrawnImage) -> None:
        self.drawn.append(image)

    def write_split(self, root: Path, split: str, info: dict[str, Any]) -> dict[str, int]:
        """Write ``nlvr2/{split}.json`` and the pair images; counts the statements."""
        import numpy as np

        config = self.config
        drawn = [(d.file_name, d.objects) for d in self.drawn]
        split_index = SPLITS.index(split)
        folder = root / "nlvr2" / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for pair in range(len(drawn) // 2):
            (left_name, left), (right_name, right) = drawn[2 * pair], drawn[2 * pair + 1]
            stem = f"{split}-0-{pair}"
            for side, name in (("img0", left_name), ("img1", right_name)):
                src, dst = root / "images" / split / name, folder / f"{stem}-{side}.png"
                try:
                    os.link(src, dst)  # same bytes, no copy
                except OSError:
                    shutil.copyfile(src, dst)
            rng = np.random.default_rng([config.seed, split_index, pair, 2])
            seen: set[str] = set()
            for _ in range(10 * config.nlvr2_statements_per_pair):
                if len(seen) == config.nlvr2_statements_per_pair:
                    break
                sentence, label = nlvr2_statement(left, right, config, rng)
                if sentence in seen:
                    continue
                seen.add(sentence)
                record = {"identifier": f"{stem}-{len(seen) - 1}", "sentence": sentence, "label": str(label)}
                lines.append(json.dumps(record, separators=(",", ":")))
        (root / "nlvr2" / f"{split}.json").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return {"nlvr2_statements": len(lines)}

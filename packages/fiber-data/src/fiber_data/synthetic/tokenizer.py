"""The synthetic world's tokenizer: a :class:`~fiber_data.text.tokenizer.ByteBPETokenizer` trained on the train
captions and saved as ``tokenizer.json`` (``tokenizer_vocab_size`` ids, at least 261)."""

from __future__ import annotations

from pathlib import Path

from fiber_data.synthetic.config import SyntheticWorldConfig
from fiber_data.synthetic.writer import DrawnImage, TaskWriter

__all__ = ["TokenizerWriter"]


class TokenizerWriter(TaskWriter):
    """Collects the captions of the train split; trains and saves the tokenizer after the last split."""

    def __init__(self, config: SyntheticWorldConfig) -> None:
        super().__init__(config)
        self.captions: list[str] = []

    def add(self, image: DrawnImage) -> None:
        if image.split == "train":
            self.captions += [text for text, _ in image.captions]

    def write_world(self, root: Path) -> None:
        from fiber_data.text.tokenizer import ByteBPETokenizer

        tokenizer = ByteBPETokenizer.train(self.captions, max(self.config.tokenizer_vocab_size, 261))
        tokenizer.save(root / "tokenizer.json")

"""Text: tokenisers (:mod:`~fiber_data.text.tokenizer`), MLM masking (:mod:`~fiber_data.text.masking`),
character spans to token maps (:mod:`~fiber_data.text.spans`) and the left/right words of captions under a
horizontal flip (:mod:`~fiber_data.text.left_right`)."""

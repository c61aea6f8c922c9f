"""Images: decoding and the resize / normalise transforms (:mod:`~fiber_data.images.transforms`), training
augmentation (:mod:`~fiber_data.images.augment`) and decoding through ``torchvision.io``
(:mod:`~fiber_data.images.tv_decode`)."""

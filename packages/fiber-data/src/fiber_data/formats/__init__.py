"""Storage formats: Arrow tables (:mod:`~fiber_data.formats.arrow`), TSV with line indices
(:mod:`~fiber_data.formats.tsv`), tar shards in the img2dataset / WebDataset layout (:mod:`~fiber_data.formats.tar`)
and the same shards streamed through the ``webdataset`` package (:mod:`~fiber_data.formats.streaming`)."""

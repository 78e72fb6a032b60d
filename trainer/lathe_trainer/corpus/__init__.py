"""The Corpus stage: turn domain sources into cleaned, deduplicated, redacted text shards.

The flow, one module per step: `readers` parses each source in its published format into
`records.Document`s (counting malformed records), `normalize` fixes Unicode and whitespace,
`dedup` removes exact and near duplicates, `decontaminate` drops documents that overlap the
evaluation sets, `pii` redacts structured identifiers, `split` assigns train/validation and
writes the shards, and `stats` and `datacard` report what each step did. `stage.run` runs them
in that order.
"""

"""The Corpus stage: turn domain sources into cleaned, deduplicated, redacted text shards.

Each step has its own module, and `stage.run` calls them in this order:

- `readers` parses each source in its published format into `records.Document`s and counts
  malformed records.
- `normalize` fixes the Unicode form and whitespace.
- `dedup` removes exact and near duplicates.
- `decontaminate` drops documents that overlap the evaluation sets.
- `pii` redacts structured identifiers.
- `split` assigns train or validation and writes the shards.

`stats` and `datacard` report what each step did.
"""

"""The PretrainJob stage: train a decoder-only language model from scratch on a Corpus."""

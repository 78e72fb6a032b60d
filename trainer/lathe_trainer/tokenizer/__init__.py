"""The Tokenizer stage: train a byte-level BPE on a Corpus, with protected domain patterns.

`stage.run` reads the Corpus, `patterns` turns the spec's protected patterns into a
pre-tokenizer and a term list, `training` trains and saves the tokenizer, and `evaluation`
measures it on the validation split.
"""

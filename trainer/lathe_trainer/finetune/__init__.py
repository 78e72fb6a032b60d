"""The FineTune stage: token classification on a pretrained decoder, with LoRA or in full.

`stage.run` is the workload entry point; `data.encode_words` and `data.encode_text` are the
tokenization convention that serving reuses.
"""

"""Triton Python-backend step 1 of the NER ensemble: UTF-8 text in, token tensors out.

The repository writer copies this file to `<model>_tokenizer/1/model.py`, with `tokenizer.json`
and the shared `ner_decoding.py` beside it. Parameters: `max_length` (tokens per window,
counting bos), `stride` (tokens of left context that each window after the first repeats),
`bos_id` (-1 for none), `unk_id` and `pad_id` (the id written into padding positions).
Outputs are [batch, windows, sequence] tensors (OFFSETS adds an axis of 2), so a text longer
than `max_length` tokens is split into windows rather than cut.
"""

import json
import os
import sys

import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ner_decoding  # noqa: E402  (a file beside this one, found through the line above)

OUTPUTS = ("input_ids", "attention_mask", "OFFSETS", "WORD_IDS")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        bos = int(parameters["bos_id"])
        self.special = ner_decoding.SpecialIds(
            bos=None if bos < 0 else bos,
            unk=int(parameters["unk_id"]),
            pad=int(parameters["pad_id"]),
        )
        self.max_length = int(parameters["max_length"])
        self.stride = int(parameters["stride"])
        ner_decoding.check_window(self.special, self.max_length, self.stride)
        self.tokenizer = ner_decoding.load_tokenizer(os.path.join(version_dir, "tokenizer.json"))

    def execute(self, requests):
        return [self.tokenize(request) for request in requests]

    def tokenize(self, request):
        raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        try:
            texts = [item.decode("utf-8") for item in raw]
        except UnicodeDecodeError as error:
            message = f"TEXT must be UTF-8 encoded: {error}."
            pb_utils.Logger.log_warn(f"Rejected a request: {message}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        encoded = ner_decoding.encode_texts(
            self.tokenizer, texts, self.special, self.max_length, self.stride
        )
        cut_tokens = int(encoded["cut_tokens"].sum())
        if cut_tokens:
            # One line per request: such words (over max_length tokens without a space) are rare.
            pb_utils.Logger.log_warn(
                f"Cut {cut_tokens} tokens from words longer than a window of {self.max_length} "
                "tokens; each such word keeps its first tokens, and one of them decides its "
                "label."
            )
        encoded = {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "OFFSETS": encoded["offsets"],
            "WORD_IDS": encoded["word_ids"],
        }
        tensors = [pb_utils.Tensor(name, encoded[name]) for name in OUTPUTS]
        return pb_utils.InferenceResponse(tensors)

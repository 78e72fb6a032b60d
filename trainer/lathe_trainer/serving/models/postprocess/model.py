"""Triton Python-backend step 3 of the NER ensemble: logits in, JSON entity spans out.

Takes the argmax over labels and decodes IOB tags into character spans of the request text with
the shared `ner_decoding.py` (the same code as the in-process reference). The inputs hold each
text's windows ([batch, windows, sequence]), and each word's label comes from the one window
where its WORD_IDS entry is set. `labels.json` beside this file lists the labels by id, and
`decoding.json` names the sub-token that carries a word's label (`labelSubtoken`).
ENTITIES holds one UTF-8 JSON list per text of `{"start", "end", "text", "label"}` objects;
offsets count Unicode code points.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ner_decoding  # noqa: E402  (a file beside this one, found through the line above)


class TritonPythonModel:
    def initialize(self, args):
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(version_dir, "labels.json"), encoding="utf-8") as handle:
            self.id2label = json.load(handle)
        with open(os.path.join(version_dir, "decoding.json"), encoding="utf-8") as handle:
            self.label_subtoken = json.load(handle)["labelSubtoken"]

    def execute(self, requests):
        return [self.decode(request) for request in requests]

    def decode(self, request):
        def tensor(name):
            return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

        texts = [item.decode("utf-8") for item in tensor("TEXT").reshape(-1)]
        entities = ner_decoding.entities_from_logits(
            texts, tensor("logits"), tensor("OFFSETS"), tensor("WORD_IDS"), self.id2label,
            self.label_subtoken,
        )
        encoded = [json.dumps(items, ensure_ascii=False).encode("utf-8") for items in entities]
        # ENTITIES is [batch, 1] whether or not Triton batching is on (dims [1] or [-1, 1]).
        output = np.array(encoded, dtype=np.object_).reshape(-1, 1)
        return pb_utils.InferenceResponse([pb_utils.Tensor("ENTITIES", output)])

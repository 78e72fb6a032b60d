"""Triton Python-backend step 2 of the NER ensemble: the exported model in ONNX Runtime.

Used where Triton has only the Python backend (the `nvidia-pytriton` wheel has no ONNX Runtime
backend). A Triton image with the ONNX Runtime backend can run the same `model.onnx` with
`backend: "onnxruntime"` instead; the tensor names are the same. The file takes
[batch, windows, sequence] inputs and returns [batch, windows, sequence, labels] logits (see
`lathe_trainer.export.window_graph`). This step runs only the windows that hold tokens, passed
as one batch of shape [1, rows, sequence], and returns zero logits for padding windows, which
the postprocess step ignores. Parameters: `onnx_file` (in the version directory) and
`intra_op_num_threads` (0 lets ONNX Runtime decide).
"""

import json
import os
import sys

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ner_decoding  # noqa: E402  (a file beside this one, found through the line above)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.num_labels = int(config["output"][0]["dims"][-1])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_num_threads", "0"))
        self.session = onnxruntime.InferenceSession(
            os.path.join(version_dir, parameters["onnx_file"]),
            options,
            providers=["CPUExecutionProvider"],
        )

    def run_rows(self, input_ids, attention_mask):
        feeds = {"input_ids": input_ids[np.newaxis], "attention_mask": attention_mask[np.newaxis]}
        (logits,) = self.session.run(["logits"], feeds)
        return logits[0]

    def execute(self, requests):
        responses = []
        for request in requests:
            input_ids, attention_mask = (
                pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(np.int64)
                for name in ("input_ids", "attention_mask")
            )
            try:
                logits = ner_decoding.run_windows(
                    self.run_rows, input_ids, attention_mask, self.num_labels
                )
            except Exception as error:  # noqa: BLE001  (ONNX Runtime raises its own types)
                message = f"ONNX Runtime failed on input shape {input_ids.shape}: {error}"
                pb_utils.Logger.log_error(message)
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
                continue
            tensor = pb_utils.Tensor("logits", logits.astype(np.float32))
            responses.append(pb_utils.InferenceResponse([tensor]))
        return responses

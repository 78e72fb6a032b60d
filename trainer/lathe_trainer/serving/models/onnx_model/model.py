"""Triton Python-backend step 2 of the NER ensemble: the exported model in ONNX Runtime.

Used where Triton has only the Python backend (the `nvidia-pytriton` wheel has no ONNX Runtime
backend). A Triton image with the ONNX Runtime backend can run the same `model.onnx` with
`backend: "onnxruntime"` instead; the tensor names are the same. Parameters: `onnx_file` (in the
version directory) and `intra_op_num_threads` (0 lets ONNX Runtime decide).
"""

import json
import os

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_num_threads", "0"))
        self.session = onnxruntime.InferenceSession(
            os.path.join(version_dir, parameters["onnx_file"]),
            options,
            providers=["CPUExecutionProvider"],
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(np.int64)
                for name in ("input_ids", "attention_mask")
            }
            try:
                (logits,) = self.session.run(["logits"], feeds)
            except Exception as error:  # noqa: BLE001  (ONNX Runtime raises its own types)
                message = f"ONNX Runtime failed on input shape {feeds['input_ids'].shape}: {error}"
                pb_utils.Logger.log_error(message)
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
                continue
            tensor = pb_utils.Tensor("logits", logits.astype(np.float32))
            responses.append(pb_utils.InferenceResponse([tensor]))
        return responses

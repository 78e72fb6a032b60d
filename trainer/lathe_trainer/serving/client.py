"""Send texts to a served Lathe NER ensemble and parse its entity spans.

The ensemble takes `TEXT` ([batch, 1] UTF-8 strings) and returns `ENTITIES` ([batch, 1] JSON
lists of `{"start", "end", "text", "label"}`). Both Triton protocols are supported, so tests
and `lathe run` can check that each one delivers the text intact.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def text_tensor(texts: list[str]) -> np.ndarray:
    return np.array([[text.encode("utf-8")] for text in texts], dtype=np.object_)


def parse_entities(output: np.ndarray) -> list[list[dict[str, Any]]]:
    return [json.loads(item.decode("utf-8")) for item in output.reshape(-1)]


def infer_entities(
    url: str, model_name: str, texts: list[str], protocol: str = "http"
) -> list[list[dict[str, Any]]]:
    """Return the entities of each text from the ensemble `model_name` at `url` (`host:port`)."""
    if protocol == "http":
        import tritonclient.http as client_module
    elif protocol == "grpc":
        import tritonclient.grpc as client_module
    else:
        raise ValueError(f"Unknown protocol {protocol!r}; use `http` or `grpc`.")
    data = text_tensor(texts)
    request_input = client_module.InferInput("TEXT", list(data.shape), "BYTES")
    request_input.set_data_from_numpy(data)
    output = client_module.InferRequestedOutput("ENTITIES")
    client = client_module.InferenceServerClient(url=url)
    try:
        result = client.infer(model_name, inputs=[request_input], outputs=[output])
    finally:
        client.close()
    return parse_entities(result.as_numpy("ENTITIES"))

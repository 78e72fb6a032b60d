"""The exported NER model served by a real tritonserver (from nvidia-pytriton) on loopback.

The repository comes from the export stage, run on a tiny random-weight classifier whose
tokenizer is trained on NCBI-disease abstracts. Answers over HTTP and gRPC are compared with the
same model run in-process in PyTorch.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http
import yaml
from tiny_ner_model import build_model
from tritonclient.utils import InferenceServerException

from lathe.api import KINDS
from lathe.plans import stage_config
from lathe_trainer.export import repository, stage
from lathe_trainer.stage import ResolvedInput
from lathe_trainer.serving import client, decoding, local_server
from lathe_trainer.serving.reference import predict_entities, read_model_settings

MODEL_NAME = "pubmed_ner"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pubmed" / "05-deployment.yaml"

pytestmark = pytest.mark.slow

UTF8_TEXTS = [
    "Ataxia-telangiectasia (A-T) is a recessive disorder of childhood.",
    "Café-au-lait spots and Ménière's disease were noted in the naïve cohort.",
    "α-thalassaemia and β-thalassemia respond differently to 5 µg/kg of deferoxamine.",
    "Patient reports 🤒 fever and 😷 cough; TNF-α levels were raised.",
    "",
    "Ωmega: 中文 текст العربية",
]


@pytest.fixture(scope="module")
def server(export_output, tmp_path_factory):
    output, _ = export_output
    with local_server.start_triton(output / "model_repository",
                                   tmp_path_factory.mktemp("triton")) as running:
        yield running
    assert running.process.poll() is not None


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_utf8_answers_match_in_process(server, export_output, protocol):
    _, model_dir = export_output
    url = server.http_url if protocol == "http" else server.grpc_url
    served = client.infer_entities(url, MODEL_NAME, UTF8_TEXTS, protocol)
    expected = predict_entities(model_dir, UTF8_TEXTS)
    assert served == expected


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_entity_text_is_the_request_text(server, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    served = client.infer_entities(url, MODEL_NAME, UTF8_TEXTS, protocol)
    assert len(served) == len(UTF8_TEXTS)
    assert served[4] == []
    non_ascii = 0
    for text, entities in zip(UTF8_TEXTS, served):
        for entity in entities:
            assert entity["text"] == text[entity["start"]:entity["end"]]
            assert entity["label"] == "Disease"
            non_ascii += any(ord(char) > 127 for char in entity["text"])
    # The random model tags most words, so non-ASCII words come back inside entities.
    assert non_ascii > 0


def test_long_and_short_texts_in_one_batch(server, export_output, data_dir):
    _, model_dir = export_output
    abstracts = (data_dir / "pubmed" / "ncbi-disease" / "corpus" / "NCBItestset_corpus.txt")
    lines = abstracts.read_text(encoding="utf-8").splitlines()
    texts = [line.split("|", 2)[2] for line in lines if "|a|" in line][:6] + ["Gout.", "A"]
    assert len(texts) == 8
    served = client.infer_entities(server.http_url, MODEL_NAME, texts)
    assert served == predict_entities(model_dir, texts)


def test_long_text_is_served_in_windows(server, export_output, data_dir):
    """A text of several windows returns entities from its tail, as the in-process model does."""
    _, model_dir = export_output
    abstracts = (data_dir / "pubmed" / "ncbi-disease" / "corpus" / "NCBItestset_corpus.txt")
    lines = abstracts.read_text(encoding="utf-8").splitlines()
    text = " ".join([line.split("|", 2)[2] for line in lines if "|a|" in line][:3])
    settings = read_model_settings(model_dir)
    tokenizer = decoding.load_tokenizer(str(model_dir / "tokenizer.json"))
    stride = decoding.default_stride(settings.max_length)
    rows = decoding.encode_text(tokenizer, text, settings.special, settings.max_length,
                                stride).rows
    assert len(rows) >= 3
    last_window_start = min(
        start for (start, _), word in zip(rows[-1].spans, rows[-1].word_ids)
        if word != decoding.NO_WORD
    )

    texts = [text, "Gout."]
    served = client.infer_entities(server.http_url, MODEL_NAME, texts)
    assert served == predict_entities(model_dir, texts)
    # The random model tags most words, so the last window's words yield entities.
    assert any(entity["start"] >= last_window_start for entity in served[0])
    for entity in served[0]:
        assert entity["text"] == text[entity["start"]:entity["end"]]


def test_printed_curl_command_answers(server, export_output):
    """The curl command that `lathe run --serve` prints returns the entities as JSON."""
    import json
    import shlex
    import subprocess
    import shutil

    from lathe.local.serving import curl_command

    _, model_dir = export_output
    text = "Breast cancer and ovarian cancer in BRCA1 carriers."
    command = shlex.split(curl_command(server.http_url, MODEL_NAME, text))
    assert command[:2] == ["curl", "-s"]
    if shutil.which("curl"):
        completed = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert completed.returncode == 0, completed.stderr
        answer = completed.stdout
    else:
        request = urllib.request.Request(command[2], data=command[4].encode(), method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = response.read().decode()
    outputs = {item["name"]: item for item in json.loads(answer)["outputs"]}
    served = json.loads(outputs["ENTITIES"]["data"][0])
    assert served == predict_entities(model_dir, [text])[0]


def test_invalid_utf8_is_rejected(server):
    data = np.array([[b"caf\xe9"]], dtype=np.object_)
    request_input = tritonclient.http.InferInput("TEXT", [1, 1], "BYTES")
    request_input.set_data_from_numpy(data)
    with tritonclient.http.InferenceServerClient(url=server.http_url) as http_client:
        with pytest.raises(InferenceServerException, match="TEXT must be UTF-8 encoded"):
            http_client.infer(MODEL_NAME, inputs=[request_input])


def test_metrics_count_successful_requests(server):
    client.infer_entities(server.http_url, MODEL_NAME, ["Breast cancer."])
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    assert f'nv_inference_request_success{{model="{MODEL_NAME}",version="1"}}' in text


def test_servers_bind_loopback_only(server):
    endpoints = server.endpoints()
    assert endpoints["http"].startswith("127.0.0.1:")
    assert endpoints["grpc"].startswith("127.0.0.1:")
    assert endpoints["metrics"].startswith("http://127.0.0.1:")


def test_unbatched_repository_loads_and_killed_server_is_cleaned(export_output, tmp_path):
    """max_batch_size 0 puts the batch dimension into dims; the server loads and runs it.

    After SIGKILL the Python backend's shared memory regions stay in /dev/shm until stop()
    removes them.
    """
    output, model_dir = export_output
    settings = read_model_settings(model_dir)
    repository.write_repository(
        tmp_path / "repository",
        repository.RepositorySettings(
            model_name="unbatched", id2label=settings.id2label, max_length=settings.max_length,
            bos_id=settings.special.bos, unk_id=settings.special.unk, pad_id=settings.special.pad,
            label_subtoken=settings.label_subtoken,
            max_batch_size=0,
        ),
        output / "model.onnx",
        model_dir / "tokenizer.json",
    )
    texts = UTF8_TEXTS[:3]
    running = local_server.start_triton(tmp_path / "repository", tmp_path / "work")
    try:
        data = client.text_tensor(texts)
        request_input = tritonclient.http.InferInput("TEXT", [len(texts), 1], "BYTES")
        request_input.set_data_from_numpy(data)
        with tritonclient.http.InferenceServerClient(url=running.http_url) as http_client:
            result = http_client.infer("unbatched", inputs=[request_input])
        assert client.parse_entities(result.as_numpy("ENTITIES")) == predict_entities(
            model_dir, texts
        )
        regions = list(Path("/dev/shm").glob(running.shm_prefix + "*"))
        assert regions
        os.kill(running.process.pid, signal.SIGKILL)
        running.process.wait(timeout=30)
        assert any(path.exists() for path in regions)
    finally:
        running.stop()
    assert not list(Path("/dev/shm").glob(running.shm_prefix + "*"))


def test_missing_backend_fails_before_start(export_output, tmp_path):
    output, model_dir = export_output
    settings = read_model_settings(model_dir)
    repository.write_repository(
        tmp_path / "repository",
        repository.RepositorySettings(
            model_name="cluster", id2label=settings.id2label, max_length=settings.max_length,
            bos_id=settings.special.bos, unk_id=settings.special.unk, pad_id=settings.special.pad,
            label_subtoken=settings.label_subtoken,
            model_backend="onnxruntime",
        ),
        output / "model.onnx",
        model_dir / "tokenizer.json",
    )
    with pytest.raises(local_server.TritonStartError, match="needs the Triton backend "
                       "'onnxruntime', which the local tritonserver lacks"):
        local_server.start_triton(tmp_path / "repository", tmp_path / "work")


def test_requested_ports_used_when_free(export_output, tmp_path):
    """--serve requests the spec's ports: Triton takes them when free, other ports when not."""
    import socket

    output, _ = export_output
    wanted = tuple(local_server.free_ports(3))
    with local_server.start_triton(output / "model_repository", tmp_path / "free",
                                   ports=wanted) as running:
        assert (running.http_port, running.grpc_port, running.metrics_port) == wanted
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", wanted[1]))
        busy.listen()
        assert local_server.busy_ports(wanted) == [wanted[1]]
        with local_server.start_triton(output / "model_repository", tmp_path / "busy",
                                       ports=wanted) as running:
            assert running.grpc_port != wanted[1]
            assert client.infer_entities(running.http_url, MODEL_NAME, ["Breast cancer."])


def test_paths_with_shell_characters_served(export_output, tmp_path):
    """A workspace path with a space and `#` still serves: Triton's Python backend starts its
    stubs through an unquoted shell command."""
    import shutil

    output, model_dir = export_output
    folder = tmp_path / "work space #1 ü"
    shutil.copytree(output / "model_repository", folder / "model repository")
    with local_server.start_triton(folder / "model repository", folder / "triton",
                                   ready_timeout_s=60) as running:
        links = running.links
        assert links is not None
        served = client.infer_entities(running.http_url, MODEL_NAME, UTF8_TEXTS[:2])
        assert (folder / "triton" / "tritonserver.log").is_file()
    assert served == predict_entities(model_dir, UTF8_TEXTS[:2])
    assert not links.exists()
    assert (folder / "model repository").is_dir()


def test_missing_repository_fails(tmp_path):
    with pytest.raises(local_server.TritonStartError, match="does not exist"):
        local_server.start_triton(tmp_path / "nothing", tmp_path / "work")


def test_external_data_model_served(tmp_path, data_dir, monkeypatch):
    """A model whose weights sit beside the graph (ONNX external data, as for models over
    1 GiB) is exported, copied into the repository with its data file and served."""
    # Every weight tensor of the tiny model is then over the limit, as in a large model.
    monkeypatch.setattr(stage, "EXTERNAL_DATA_BYTES", 0)
    model_dir = build_model(data_dir, tmp_path / "finetune" / "model")
    resource = yaml.safe_load(EXAMPLE.read_text())
    resource["spec"]["export"]["quantization"]["enabled"] = False
    resource["spec"]["export"]["checkSequenceLengths"] = [3, 20]
    inputs = {"model": ResolvedInput(kind="FineTune", name="pubmed-ner",
                                     uri=f"file://{tmp_path / 'finetune'}", digest="sha256:f")}
    output = tmp_path / "export"
    deployment = KINDS["ModelDeployment"].model_validate(resource)
    metrics = stage.run(stage_config(deployment, inputs, f"file://{output}", str(data_dir)),
                        resume=False)
    assert (output / "model.onnx.data").is_file()
    assert metrics["onnxSizeBytes"] > (output / "model.onnx").stat().st_size
    version = output / "model_repository" / "pubmed_ner_model" / "1"
    assert sorted(path.name for path in version.iterdir() if path.suffix != ".py") == [
        "model.onnx", "model.onnx.data"]
    with local_server.start_triton(output / "model_repository", tmp_path / "work") as running:
        served = client.infer_entities(running.http_url, MODEL_NAME, UTF8_TEXTS)
    assert served == predict_entities(model_dir, UTF8_TEXTS)

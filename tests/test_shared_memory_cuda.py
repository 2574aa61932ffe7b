"""CUDA shared memory on a GPU (issue 16), in one process and behind `--workers 2`: a client
process allocates device memory, registers its cudaIpcMemHandle_t with tritonclient.grpc exactly
as tritonclient.utils.cuda_shared_memory sends it, and infers with inputs and outputs there,
against a torch model (the input stays on the device) and an ONNX one (one copy to the host).
Skips without CUDA. The same path without a GPU, through a stand-in for the CUDA runtime's
calls: tests/test_shared_memory_cuda_double.py.

This module imports only what the GPU image gets (scripts/gpu_check.sh runs it there): no
tritonclient.http, no hypothesis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, TEST_PLUGINS, Workers, link_plugins

# The client must be another process: CUDA refuses a handle opened in the process that made it.
CLIENT = r"""
import base64, ctypes, json, sys
import numpy as np, torch, tritonclient.grpc as tc
from hub.shm.cuda import _IpcHandle, _loaded_runtime
torch.zeros(1, device="cuda")
rt = ctypes.CDLL(_loaded_runtime() or "libcudart.so.13")
rt.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
rt.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_void_p]
rt.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
def region(size):
    pointer = ctypes.c_void_p()
    assert rt.cudaMalloc(ctypes.byref(pointer), size) == 0
    handle = _IpcHandle()
    assert rt.cudaIpcGetMemHandle(ctypes.byref(handle), pointer) == 0
    return pointer.value, base64.b64encode(bytes(handle))
client = tc.InferenceServerClient(sys.argv[1])
# A handle CUDA cannot open: refused, and its error must not stay behind on the server's thread
# for the inferences below (torch would raise it at their next kernel launch).
try:
    client.register_cuda_shared_memory("bogus", base64.b64encode(b"\x07" * 64), 0, 64)
    raise SystemExit("a bogus CUDA IPC handle was accepted")
except tc.InferenceServerException as refused:
    assert "cannot be opened" in refused.message(), refused.message()
x = np.arange(8, dtype=np.float32).reshape(2, 4)
out = {}
for model, output, expected in (("affine_torch", "y", x * 2 + 1), ("affine_onnx", "y", x * 2 + 1)):
    src, src_handle = region(x.nbytes)
    dst, dst_handle = region(4096)
    assert rt.cudaMemcpy(src, x.ctypes.data, x.nbytes, 4) == 0
    assert rt.cudaDeviceSynchronize() == 0  # from pageable memory, cudaMemcpy may return before the DMA lands
    client.register_cuda_shared_memory("in_" + model, src_handle, 0, x.nbytes)
    client.register_cuda_shared_memory("out_" + model, dst_handle, 0, 4096)
    tensor = tc.InferInput("x", [2, 4], "FP32")
    tensor.set_shared_memory("in_" + model, x.nbytes)
    wanted = tc.InferRequestedOutput(output)
    wanted.set_shared_memory("out_" + model, 4096)
    result = client.infer(model, [tensor], outputs=[wanted, tc.InferRequestedOutput("total")])
    got = np.empty_like(x)
    assert rt.cudaMemcpy(got.ctypes.data, dst, got.nbytes, 4) == 0
    out[model] = {"ok": bool(np.allclose(got, expected)), "total": result.as_numpy("total").ravel().tolist()}
status = client.get_cuda_shared_memory_status()
out["status"] = sorted((name, r.byte_size) for name, r in status.regions.items())
client.unregister_cuda_shared_memory()
out["after"] = len(client.get_cuda_shared_memory_status().regions)
print(json.dumps(out))
"""


def _run_client(url: str) -> None:
    done = subprocess.run([sys.executable, "-c", CLIENT, url], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for model in ("affine_torch", "affine_onnx"):
        assert result[model] == {"ok": True, "total": [6.0, 22.0]}, result
    assert [name for name, _ in result["status"]] == sorted(
        ["in_affine_onnx", "in_affine_torch", "out_affine_onnx", "out_affine_torch"]
    )
    assert result["after"] == 0


@pytest.mark.gpu
def test_cuda_shared_memory_inputs_and_outputs(start_server: Any, tmp_path: Path) -> None:
    server = start_server(
        link_plugins(tmp_path / "p", TEST_PLUGINS / "torch_models.py"),
        device="cuda",
        metrics_port=None,
        shared_memory=frozenset({"system", "cuda"}),
    )
    assert "cuda_shared_memory" in server.server.plane.server_metadata()[2]  # type: ignore[union-attr]
    _run_client(server.url)
    regions = server.server.shared_memory.regions()  # type: ignore[union-attr]
    assert regions == []


@pytest.mark.gpu
def test_cuda_shared_memory_behind_workers(model_repository: Path, tmp_path: Path) -> None:
    """--workers 2 on a GPU: the model process opens the handles, in its models' CUDA context
    (the test above built the models into the session's repository)."""
    plugins = link_plugins(tmp_path / "p", TEST_PLUGINS / "torch_models.py")
    server = Workers(
        plugins, model_repository, tmp_path, 2, "--device", "cuda", "--shared-memory", "system,cuda",
        "--model-copies", "none",
    )  # fmt: skip
    try:
        _run_client(server.url)
    finally:
        assert server.stop() == 0, server.output()

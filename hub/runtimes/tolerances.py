"""The default parity tolerances of the built-in targets, by the kind of numeric change a target makes."""

from hub.spec import Tolerance

#: fp32 all the way (onnx, torch-compile, and eager itself in the batch-invariance check): float rounding only.
FP32 = Tolerance(atol=1e-4, rtol=1e-3)
#: int8 weights and activations (onnx-int8, onnx-int8-dynamic, torch-int8).
QUANTISED = Tolerance(atol=0.05, rtol=0.1, min_top1=0.95, max_accuracy_drop=0.01)
#: fp16 or bf16 compute (torch-fp16, torch-bf16, onnx-fp16, onnx-bf16).
HALF = Tolerance(atol=1e-2, rtol=2e-2, min_top1=0.99, max_accuracy_drop=0.01)

"""Built-in targets and runtimes (torch eager, ONNX Runtime), each an ordinary plugin."""

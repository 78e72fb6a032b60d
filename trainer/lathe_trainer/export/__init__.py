"""The export stage of a ModelDeployment: ONNX export, its checks, INT8 quantization and the
Triton model repository."""

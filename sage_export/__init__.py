"""sage-export: SAGE-PTQ ~1-bit quantization, ONNX export with SageBinaryGemm, CUDA/TensorRT runtime."""

__version__ = "0.1.0"

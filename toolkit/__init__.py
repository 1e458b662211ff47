"""dtk: train a DDPM U-Net, export it to ONNX and TensorRT, and sample with a torch-free runtime."""

__version__ = "0.1.0"

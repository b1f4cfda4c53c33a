"""Model stages: the ONNX tier, the VLM tier and calibration, each usable without Ray."""

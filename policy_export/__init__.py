"""BlockPilot policy pipeline: collect oracle labels, train, export to ONNX, evaluate."""

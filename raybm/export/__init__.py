"""Export: ONNX, int8, pruned and distilled variants of a trained model, measured side by side."""

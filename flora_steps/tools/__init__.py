"""Commands outside the pipeline: ``flora flops`` (MACs and parameters of any model) and ``flora export`` (ONNX)."""

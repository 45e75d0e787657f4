"""Export a model artifact (e.g. a retrained compressed model) to ONNX and check it with ONNX Runtime.

    flora export results/retrain/flora/0.5/model model.onnx

The ONNX graph takes a batch of images of any size (dynamic first dimension) and
returns the logits; the export uses PyTorch's ``torch.export``-based exporter.
When ONNX Runtime is installed the exported file is run once and compared with
PyTorch's output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..runtime.artifacts import atomic_path, load_model
from ..runtime.models import input_shape


def export_onnx(model: nn.Module, shape: tuple[int, ...], path: str | Path, batch: int = 2) -> None:
    """Write ``model`` (eval mode) as ONNX with a dynamic batch dimension, atomically."""
    model.eval()
    example = torch.randn((batch, *shape))
    with atomic_path(Path(path)) as temporary:
        program = torch.onnx.export(
            model, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False
        )
        program.save(str(temporary))


def onnx_max_difference(model: nn.Module, shape: tuple[int, ...], path: str | Path, batch: int = 3) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's logits on random images."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn((batch, *shape))
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    return float(np.abs(logits - expected).max())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="model artifact stem, e.g. results/retrain/flora/0.5/model")
    parser.add_argument("output", type=Path, help="ONNX file to write, e.g. model.onnx")


def run(args: argparse.Namespace) -> int:
    if args.output.suffix != ".onnx":
        raise UserError(f"{args.output}: expected a file name ending in .onnx")
    model, spec = load_model(args.model)
    shape = input_shape(model)
    export_onnx(model, shape, args.output)
    print(f"wrote {args.output} ({spec.model}, input N x {' x '.join(map(str, shape))})")
    try:
        difference = onnx_max_difference(model, shape, args.output)
    except ImportError:
        print("onnxruntime not installed: skipped the check against PyTorch")
        return 0
    print(f"ONNX Runtime matches PyTorch: max |difference| {difference:.2e}")
    return 0

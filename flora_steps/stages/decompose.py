"""Factorise the target layers of the base model by SVD.

Every linear layer whose module path matches a `decompose.targets` pattern is
replaced by a full-rank `LowRankLinear` holding its balanced SVD factors
(`first = sqrt(S) Vᵀ`, `second = U sqrt(S)`), so that keeping the leading `r`
components is the optimal rank-`r` approximation. Writes `results/decompose/`:

- `model.safetensors` + `model.json`: the factorised model (supernet initialiser)
- `spectra.csv`: every singular value of every layer, with its cumulative energy
- `spectra.png`: the normalised spectra, one panel per target pattern
- `layers.csv`: shape, full rank, break-even rank and tokens of each target layer
- `metrics.json`: full-rank reconstruction error of the logits, MACs, parameters
"""

from __future__ import annotations

import copy
import logging
from fnmatch import fnmatchcase

import pandas as pd
import torch

from ..core import CostModel, factorise, find_linear_layers, trace_costs
from ..core.lowrank import break_even_rank
from ..errors import UserError
from ..report.layer_figures import plot_spectra
from ..runtime.artifacts import load_model, save_figure, save_model, write_csv, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.models import input_shape
from ..runtime.progress import progress

log = logging.getLogger(__name__)


def spectra_table(spectra: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per singular value: layer, index, value, value / largest, cumulative energy."""
    rows = []
    for name, values in spectra.items():
        values = values.double()
        energy = (values**2).cumsum(0) / (values**2).sum()
        for index, (value, cumulative) in enumerate(zip(values.tolist(), energy.tolist(), strict=True)):
            rows.append((name, index + 1, value, value / values[0].item(), cumulative))
    return pd.DataFrame(rows, columns=["layer", "index", "singular_value", "relative", "energy"])


def layers_table(costs: CostModel, names: list[str]) -> pd.DataFrame:
    """Shape, full rank and break-even rank (first rank that is not cheaper than dense) per layer."""
    rows = []
    for name in names:
        layer = costs.layers[name]
        break_even = break_even_rank(layer.in_features, layer.out_features)
        rows.append((name, layer.in_features, layer.out_features, layer.full_rank, break_even, layer.tokens))
    return pd.DataFrame(
        rows, columns=["layer", "in_features", "out_features", "full_rank", "break_even_rank", "tokens"]
    )


@torch.no_grad()
def max_logit_error(dense: torch.nn.Module, factorised: torch.nn.Module, seed: int, images: int = 8) -> float:
    """Largest absolute logit difference between two models on random inputs."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((images, *input_shape(dense)), generator=generator)
    dense.eval(), factorised.eval()
    return (dense(x) - factorised(x)).abs().max().item()


def run(context: StageContext) -> None:
    params = context.params
    dense, spec = load_model(context.input("model"))
    patterns = params.decompose.targets
    names = find_linear_layers(dense, patterns)
    if not names:
        raise UserError(f"decompose.targets: no linear layer of {spec.model} matches {patterns}")
    unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise UserError(f"decompose.targets: pattern(s) {unmatched} match no linear layer of {spec.model}")
    log.info("factorising %d layers of %s", len(names), spec.model)

    costs = trace_costs(dense, input_shape(dense))
    factorised = copy.deepcopy(dense)
    spectra = factorise(factorised, progress(names, desc="SVD"))
    error = max_logit_error(dense, factorised, params.seed)
    log.info("full-rank factorisation: max |logit error| = %.2e", error)

    table = spectra_table(spectra)
    lowrank = {name: factorised.get_submodule(name).max_rank for name in names}
    save_model(context.output("model"), factorised, spec.model_copy(update={"lowrank": lowrank}))
    write_csv(context.output("spectra"), table)
    write_csv(context.output("layers"), layers_table(costs, names))
    save_figure(context.output("plot"), plot_spectra(table, patterns))
    write_json(
        context.output("metrics"),
        {"layers": len(names), "max_abs_logit_error": error, "macs": costs.dense_macs, "params": costs.dense_params}
        | {"seconds": context.seconds()},
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("decompose", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)

"""Keep FLORA's scored rank tuples by predicted latency: the search space of FLORA under latency budgets.

    python -m flora_steps.stages.filter_latency --params params.yaml

The `filter` stage scores every rank tuple of every block once: the KL divergence of
its logits from the dense model's (`sensitivity.csv`). This stage keeps, per block, the
same share of them as the filter (`filter.keep_ratio` in each of `filter.bins` bins,
plus the dense and the cheapest tuple; `flora_steps.core.filter`) with the latency the
machine's table predicts (`latency_table`: each layer at its rank) as the cost in place
of MACs: equal-width bins of predicted milliseconds, ranked by KL per millisecond saved.
A tuple predicted no faster than dense saves nothing and ranks last. `supernet --method
flora_latency` trains on this space and `search --method flora_latency` searches it.
Writes `results/filter_latency/`:

- `space.json`: per block, its layers, full ranks and the kept rank tuples
- `sensitivity.csv`: every scored tuple (ranks, predicted and saved milliseconds, KL,
  score, kept, and whether the MACs filter kept it)
- `metrics.json`: tuples kept, how many the MACs filter keeps too, search-space size
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.filter import efficiency, keep_efficient
from ..core.latency import LatencyTable
from ..core.space import BlockSpace, Choice, SearchSpace
from ..errors import UserError
from ..runtime.artifacts import read_csv, read_space, write_csv, write_json, write_text
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.latency import read_latency_table

log = logging.getLogger(__name__)


def block_ms(table: LatencyTable, block: BlockSpace, choice: Choice) -> float:
    """Predicted milliseconds of a block's target layers at one of its rank tuples (full rank: dense)."""
    return sum(table.layer_ms(layer, rank) for layer, rank in block.ranks(choice).items())


def scored_choices(scores: pd.DataFrame, block: BlockSpace) -> tuple[list[Choice], pd.DataFrame]:
    """A block's scored rank tuples and their rows of the filter's ``sensitivity.csv``."""
    rows = scores[scores["block"] == block.name].reset_index(drop=True)
    roles = [block.role(layer) for layer in block.layers]
    return [tuple(int(rank) for rank in ranks) for ranks in rows[roles].itertuples(index=False)], rows


#: The filter's columns this stage reads besides each block's rank roles.
SCORE_COLUMNS = ("block", "macs", "saved_macs", "kl", "score", "kept")


def read_scores(path: Path, space: SearchSpace) -> pd.DataFrame:
    """The filter's ``sensitivity.csv``, checked against its space: one line naming what is missing or not a number."""
    scores = read_csv(path)
    roles = {block.role(layer) for block in space.blocks for layer in block.layers}
    missing = [column for column in (*SCORE_COLUMNS, *sorted(roles)) if column not in scores.columns]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r}; expected the filter's scores (rerun the filter stage)")
    numeric = [column for column in ("kl", *sorted(roles)) if not pd.api.types.is_numeric_dtype(scores[column])]
    if numeric or scores[["kl", *sorted(roles)]].isna().any(axis=None):
        raise UserError(f"{path}: column {(numeric or ['kl'])[0]!r} holds values that are not numbers")
    for block in space.blocks:
        rows = scores[scores["block"] == block.name]
        roles_of = [block.role(layer) for layer in block.layers]
        scored = {tuple(int(rank) for rank in ranks) for ranks in rows[roles_of].itertuples(index=False)}
        if block.dense not in scored:
            raise UserError(f"{path}: block {block.name!r} has no score of its dense tuple {block.dense}")
    return scores


def run(context: StageContext) -> None:
    params, cfg = context.params, context.params.filter
    by_macs = read_space(context.input("space"))  # the MACs filter's: every block's layers and full ranks
    scores = read_scores(context.input("scores"), by_macs)
    table = read_latency_table(context.input("table"), context.device, params)
    kept_blocks, rows = [], []
    for block in by_macs.blocks:
        choices, scored = scored_choices(scores, block)
        try:
            milliseconds = np.array([block_ms(table, block, choice) for choice in choices])
        except KeyError as error:
            raise UserError(f"{context.input('table')}: layer {error} of the filter's space is not timed") from None
        saved = block_ms(table, block, block.dense) - milliseconds
        damage = scored["kl"].to_numpy()
        kept = keep_efficient(milliseconds, saved, damage, cfg.keep_ratio, cfg.bins, choices.index(block.dense))
        survivors = tuple(choice for choice, keep in zip(choices, kept, strict=True) if keep)
        kept_blocks.append(BlockSpace(block.name, block.layers, block.full_ranks, survivors))
        rows.append(
            scored.drop(columns=["macs", "saved_macs", "score", "kept"]).assign(
                predicted_ms=milliseconds.round(5),
                saved_ms=saved.round(5),
                score=efficiency(damage, saved),
                kept=kept,
                kept_by_macs=scored["kept"].to_numpy(),
            )
        )
        both = (kept & scored["kept"].to_numpy()).sum()
        log.info("%s: kept %d of %d tuples (%d of them kept by MACs too)", block.name, kept.sum(), len(choices), both)
    space = SearchSpace(tuple(kept_blocks))
    table_rows = pd.concat(rows, ignore_index=True)
    write_text(context.output("space"), space.to_json())
    write_csv(context.output("sensitivity"), table_rows)
    write_json(
        context.output("metrics"),
        {
            "scored": len(table_rows),
            "kept": int(table_rows["kept"].sum()),
            "kept_by_both": int((table_rows["kept"] & table_rows["kept_by_macs"]).sum()),
            "space_size_log10": round(sum(math.log10(len(b.choices)) for b in space.blocks), 3),
            "seconds": context.seconds(),
        },
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("filter_latency", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)

"""Rank configuration: which linear layers are factorised, and at which rank.

JSON form: ``{"model": "<timm name>", "ranks": {"blocks.0.attn.qkv": 96, ...}}``;
a layer not listed is dense.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RankConfig:
    """A model name and a rank per factorised layer."""

    model: str
    ranks: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        """Stable, human-readable JSON text (layers in model order as given)."""
        return json.dumps({"model": self.model, "ranks": dict(self.ranks)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RankConfig:
        """Parse and check the JSON form; raise ``ValueError`` naming what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON ({error})") from None
        if not isinstance(data, dict) or set(data) != {"model", "ranks"}:
            raise ValueError('expected an object with exactly the keys "model" and "ranks"')
        if not isinstance(data["model"], str) or not data["model"]:
            raise ValueError('"model" must be a non-empty string')
        ranks = data["ranks"]
        if not isinstance(ranks, dict):
            raise ValueError('"ranks" must map layer names to ranks')
        for name, rank in ranks.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f'rank of "{name}" must be a positive integer, got {rank!r}')
        return cls(model=data["model"], ranks=dict(ranks))

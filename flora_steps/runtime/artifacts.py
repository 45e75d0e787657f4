"""Reading and writing stage artifacts, always atomically (temporary file, then rename).

A model artifact is ``<stem>.safetensors`` (the state dict) beside ``<stem>.json``
(what to build before loading it: the timm model name, its keyword arguments and
which layers are low-rank; ``models.build_model`` builds it). Training checkpoints
use ``torch.save`` and are read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from ..core import RankConfig
from ..core.space import SearchSpace
from ..errors import UserError, first_line
from ..pruning.structure import PrunedBlock
from .models import build_model

if TYPE_CHECKING:  # pandas and matplotlib load only in the stages that write tables and figures
    import pandas as pd
    from matplotlib.figure import Figure

MODEL_FORMAT = "flora-model/2"
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes files private; give them the usual permissions
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete what ``atomic_path`` leaves behind when a process is killed mid-write; returns what it removed."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file, naming it and ``what`` it should be in the error."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found (run the stage that writes it first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: corrupt {what}, not valid JSON ({error})") from None


def read_csv(path: str | Path) -> pd.DataFrame:
    """A CSV artifact; one line when it is missing."""
    import pandas as pd  # only the stages that read tables load pandas

    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run the stage that writes it first)") from None


def write_csv(path: str | Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as temporary:
        table.to_csv(temporary, index=False, float_format="%.6g")


def save_figure(path: str | Path, figure: Figure) -> None:
    """Save without timestamps or version stamps, so the same figure gives the same bytes."""
    path = Path(path)
    metadata = {"pdf": {"CreationDate": None, "Producer": None}, "svg": {"Date": None}}.get(
        path.suffix[1:], {"Software": None}
    )
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=path.suffix[1:], metadata=metadata, dpi=150, bbox_inches="tight")


def read_rank_config(path: str | Path) -> RankConfig:
    path = Path(path)
    try:
        return RankConfig.from_json(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: rank config not found") from None
    except ValueError as error:
        raise UserError(f"{path}: bad rank config: {error}") from None


def write_rank_config(path: str | Path, config: RankConfig) -> None:
    write_text(path, config.to_json())


def read_space(path: str | Path, full_ranks: dict[str, int] | None = None) -> SearchSpace:
    """The filtered search space ``filter`` wrote, checked for consistency and, when given,
    against the model's low-rank layers and their full ranks."""
    data = read_json(path, "search space")
    try:
        space = SearchSpace.from_dict(data)
        space.check(full_ranks)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: corrupt search space ({error})") from None
    return space


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """A training checkpoint, or ``None`` when there is none; ``ValueError`` saying why when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - zip, pickle and storage errors all mean an unreadable file
        raise ValueError(first_line(error)) from None
    if not isinstance(state, dict):
        raise ValueError(f"expected a dict of training state, got {type(state).__name__}")
    return state


class ModelSpec(BaseModel):
    """What to build before a model artifact's state dict can be loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = MODEL_FORMAT
    model: str
    model_kwargs: dict[str, Any]
    pruned: dict[str, PrunedBlock] = {}  # block -> its sizes after ViT-Slim's or OFB's slicing (``restructure_blocks``)
    embed_dim: int | None = None  # the embedding width after OFB's slicing (``pruning.ofb.restructure_embedding``)
    lowrank: dict[str, int] = {}  # layer -> max rank of its LowRankLinear (supernets)
    factorised: dict[str, int] = {}  # layer -> rank of its nn.Sequential(Linear(in, r), Linear(r, out)) pair

    def build(self) -> nn.Module:
        """The uninitialised model this spec describes: timm's model, pruned, then low-rank (in that order)."""
        return build_model(self.model, self.model_kwargs, self.lowrank, self.factorised, self.pruned, self.embed_dim)


def save_model(stem: str | Path, model: nn.Module, spec: ModelSpec) -> None:
    """Write ``<stem>.safetensors`` and ``<stem>.json``."""
    stem = Path(stem)
    with atomic_path(stem.with_suffix(".safetensors")) as temporary:
        safetensors.torch.save_model(model, str(temporary))
    write_text(stem.with_suffix(".json"), spec.model_dump_json(indent=2) + "\n")


def load_model(stem: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Build the model described by ``<stem>.json`` and load ``<stem>.safetensors`` into it."""
    stem = Path(stem)
    meta_path, weights_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    try:
        spec = ModelSpec.model_validate(read_json(meta_path, "model description"))
    except ValidationError as error:
        raise UserError(f"{meta_path}: corrupt model description ({error.errors()[0]['msg']})") from None
    if spec.format != MODEL_FORMAT:
        raise UserError(f"{meta_path}: unsupported model format {spec.format!r}, expected {MODEL_FORMAT!r}")
    if not weights_path.is_file():
        raise UserError(f"{weights_path}: model weights not found (run the stage that writes it first)")
    try:
        model = spec.build()
    except Exception as error:  # noqa: BLE001 - unknown names, bad kwargs, layers that are not there
        raise UserError(f"{meta_path}: cannot build model {spec.model!r} from it ({first_line(error)})") from None
    try:
        safetensors.torch.load_model(model, str(weights_path), strict=True)
    except Exception as error:  # noqa: BLE001 - header, size and key errors all mean a corrupt artifact
        raise UserError(f"{weights_path}: corrupt or mismatched model weights ({first_line(error)})") from None
    return model, spec


def save_masks(path: str | Path, masks: dict[tuple[str, str], torch.Tensor]) -> None:
    """ViT-Slim's mask values as safetensors, one tensor per ``<block>/<type>`` (e.g. ``blocks.0/mlp``)."""
    tensors = {f"{block}/{kind}": mask.detach().cpu().contiguous() for (block, kind), mask in masks.items()}
    with atomic_path(path) as temporary:
        safetensors.torch.save_file(tensors, str(temporary))


def read_masks(path: str | Path) -> dict[tuple[str, str], torch.Tensor]:
    """The masks ``save_masks`` wrote, by (block, type)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: masks not found (run the stage that writes them first)")
    try:
        tensors = safetensors.torch.load_file(str(path))
        return {tuple(key.split("/")): value for key, value in tensors.items()}
    except Exception as error:  # noqa: BLE001 - header and format errors all mean a corrupt file
        raise UserError(f"{path}: corrupt mask file ({first_line(error)})") from None

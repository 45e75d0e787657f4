"""Low-rank linear layer with nested rank slicing.

A weight ``W`` (out x in) is stored as two factors ``first`` (max_rank x in) and
``second`` (out x max_rank) so that ``y = second[:, :r] @ (first[:r] @ x) + bias``.
The active rank ``r`` can be changed at any time; every rank shares the leading
components of the same two factors, which is what a low-rank supernet needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def factorised_is_cheaper(in_features: int, out_features: int, rank: int) -> bool:
    """True when ``rank`` factors cost fewer MACs (and parameters) than the dense weight."""
    return rank * (in_features + out_features) < in_features * out_features


def break_even_rank(in_features: int, out_features: int) -> int:
    """The first rank whose factors are not cheaper than the dense weight (from it on, a layer stays dense)."""
    return -(-in_features * out_features // (in_features + out_features))


def full_rank(in_features: int, out_features: int) -> int:
    """The largest meaningful rank of an ``out x in`` weight."""
    return min(in_features, out_features)


def weight_cost(in_features: int, out_features: int, rank: int | None) -> int:
    """Multiplies per token (= weight parameters) of a linear layer at ``rank``.

    ``None``, full rank and any rank at or above break-even cost the dense weight,
    because such a layer is materialised dense.
    """
    if rank is None or not factorised_is_cheaper(in_features, out_features, rank):
        return in_features * out_features
    return rank * (in_features + out_features)


def factorised_pair(
    in_features: int,
    out_features: int,
    rank: int,
    bias: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """A rank-``rank`` linear layer as plain layers: ``Sequential(Linear(in, rank, bias=False), Linear(rank, out))``."""
    factory = {"device": device, "dtype": dtype}
    return nn.Sequential(
        nn.Linear(in_features, rank, bias=False, **factory), nn.Linear(rank, out_features, bias=bias, **factory)
    )


def svd_factors(weight: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced thin-SVD factors of ``weight`` (out x in), truncated to ``rank``.

    Returns ``(first, second, singular_values)`` with ``first = sqrt(S) Vᵀ``
    (rank x in) and ``second = U sqrt(S)`` (out x rank), so ``second @ first`` is the
    optimal rank-``rank`` approximation of ``weight``. The square root of the
    singular values is split evenly between the two factors so that both have the
    same scale, which keeps gradient steps on the two factors balanced during
    supernet training. The SVD runs in float64 for accuracy; the factors come back
    in the weight's dtype. ``singular_values`` holds the full spectrum.
    """
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    rank = s.numel() if rank is None else rank
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    second = u[:, :rank] * root[None, :]
    return first.to(weight.dtype), second.to(weight.dtype), s.to(weight.dtype)


class LowRankLinear(nn.Module):
    """``nn.Linear`` replacement holding two factors with a settable active rank."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        max_rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= max_rank <= full_rank(in_features, out_features):
            raise ValueError(f"max_rank must lie in [1, {full_rank(in_features, out_features)}], got {max_rank}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.max_rank = max_rank
        self.first = nn.Parameter(torch.empty(max_rank, in_features, **factory))
        self.second = nn.Parameter(torch.empty(out_features, max_rank, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self._rank = max_rank
        self.reset_factors()

    def reset_factors(self, generator: torch.Generator | None = None) -> None:
        """Draw both factors at random (the bias stays): ``first`` with std 1/sqrt(in), ``second`` with std
        1/sqrt(max_rank), so that at full rank the layer keeps its input's scale, as a fresh linear layer does."""
        with torch.no_grad():
            self.first.normal_(0.0, self.in_features**-0.5, generator=generator)
            self.second.normal_(0.0, self.max_rank**-0.5, generator=generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_rank: int | None = None) -> LowRankLinear:
        """Factorise ``linear`` by SVD, keeping the leading ``max_rank`` components (all by default)."""
        max_rank = max_rank or full_rank(linear.in_features, linear.out_features)
        layer = cls(
            linear.in_features,
            linear.out_features,
            max_rank,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        first, second, _ = svd_factors(linear.weight, max_rank)
        with torch.no_grad():
            layer.first.copy_(first)
            layer.second.copy_(second)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def rank(self) -> int:
        """The active rank used by ``forward``."""
        return self._rank

    @rank.setter
    def rank(self, rank: int) -> None:
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank must lie in [1, {self.max_rank}], got {rank}")
        self._rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._rank
        return F.linear(F.linear(x, self.first[:r]), self.second[:, :r], self.bias)

    def dense_weight(self, rank: int | None = None) -> torch.Tensor:
        """The (out x in) weight that ``rank`` components represent."""
        r = self._rank if rank is None else rank
        return self.second[:, :r] @ self.first[:r]

    def materialise(self, rank: int | None = None) -> nn.Module:
        """Plain layers computing the same function at ``rank`` (the active rank by default).

        Returns ``factorised_pair(in, out, r)`` with the leading ``r`` components when that
        is cheaper than the dense weight, else a single dense ``nn.Linear``.
        """
        r = self._rank if rank is None else rank
        return self.materialise_as(r, r if factorised_is_cheaper(self.in_features, self.out_features, r) else None)

    def materialise_as(self, rank: int, width: int | None) -> nn.Module:
        """Plain layers computing the same function at ``rank``, in the form ``width`` picks: ``None``, one dense
        ``nn.Linear`` holding ``second @ first``; a width at or above ``rank``, ``factorised_pair(in, out, width)``
        whose components past ``rank`` are zero (a rank the device's kernels run faster, the same function)."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank must lie in [1, {self.max_rank}], got {rank}")
        if width is not None and width < rank:
            raise ValueError(f"width must be at least the rank {rank}, got {width}")
        factory = {"device": self.first.device, "dtype": self.first.dtype}
        has_bias = self.bias is not None
        with torch.no_grad():
            if width is None:
                dense = nn.Linear(self.in_features, self.out_features, bias=has_bias, **factory)
                dense.weight.copy_(self.dense_weight(rank))
                if has_bias:
                    dense.bias.copy_(self.bias)
                return dense
            pair = factorised_pair(self.in_features, self.out_features, width, has_bias, **factory)
            pair[0].weight.zero_()
            pair[1].weight.zero_()
            pair[0].weight[:rank].copy_(self.first[:rank])
            pair[1].weight[:, :rank].copy_(self.second[:, :rank])
            if has_bias:
                pair[1].bias.copy_(self.bias)
        return pair

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"max_rank={self.max_rank}, rank={self._rank}, bias={self.bias is not None}"
        )

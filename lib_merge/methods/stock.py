"""Model Stock: move from the base toward the models' average by a ratio from how aligned the deltas are."""
from __future__ import annotations

import torch

from .common import _gram_pass
from .spec import Param, merge_method


def model_stock_t(gram: torch.Tensor) -> float:
    """Model Stock's interpolation ratio t = n·c / (1 + (n−1)·c), c = mean cosine over all pairs of deltas.

    A delta of norm 0 has cosine 0 with every other; t = 0 when the denominator is not positive.
    """
    n = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    outer = norms[:, None] * norms[None, :]
    cos = torch.where(outer > 0, gram / outer.clamp(min=1e-300), torch.zeros_like(gram))
    c = float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
    denom = 1 + (n - 1) * c
    return n * c / denom if denom > 1e-12 else 0.0


def _stock_prepare(stream, *, per_row, **_):
    if per_row and len(stream.shape) >= 2:
        return None  # rows are whole in every chunk: computed there
    return model_stock_t(_gram_pass(stream, lambda c: c.models.sub_(c.base), center=False))


@merge_method("model_stock", many=True, base="required",
              params=[Param("per_row", bool, False, help="one ratio per output row instead of per tensor")],
              label="Model Stock", formula="θ0 + t·mean(δi), t = n·c/(1 + (n−1)·c)", prepare=_stock_prepare)
def model_stock(models, *, base, per_row, stats, rng=None):
    """Move from the base toward the models' average by t, from how aligned their deltas are."""
    n = models.shape[0]
    deltas = models.sub_(base)
    if stats is None:  # per row: the Gram matrix of each row of the deltas
        d = deltas.reshape(n, deltas.shape[1], -1)
        gram = torch.einsum("irk,jrk->rij", d, d).double()
        norms = gram.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
        outer = norms[:, :, None] * norms[:, None, :]
        cos = torch.where(outer > 0, gram / outer.clamp(min=1e-300), torch.zeros_like(gram))
        c = (cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))
        denom = 1 + (n - 1) * c
        t = torch.where(denom > 1e-12, n * c / denom.clamp(min=1e-12), torch.zeros_like(c))
        t = t.to(deltas.dtype).view((-1,) + (1,) * (deltas.dim() - 2))
        return base.add_(deltas.mean(0).mul_(t))
    return base.add_(deltas.mean(0), alpha=stats)

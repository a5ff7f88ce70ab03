"""The classic two- and three-model methods: weighted sum, add difference, sum twice, triple sum."""
from __future__ import annotations

from .common import _lerp
from .spec import Param, merge_method

ALPHA = Param("alpha", float, 0.5, (-1.0, 2.0), "weight of B (0 = all A, 1 = all B)", blockwise=True)
BETA = Param("beta", float, 0.5, (-1.0, 2.0), "weight of C", blockwise=True)


@merge_method("weighted_sum", inputs=("A", "B"), params=[ALPHA], label="Weighted sum",
              formula="A·(1−α) + B·α",
              finish=lambda t, *, inplace, alpha: _lerp(t[0], t[1], alpha, inplace))
def weighted_sum(inputs, *, rng=None, base=None, stats=None, **_):
    """Linear interpolation between A and B (exact A at α=0 and exact B at α=1)."""
    a, b = inputs
    return a, b


def _add_difference_finish(t, *, inplace, alpha):
    a, d = t
    return (d.mul_(alpha) if inplace else d * alpha).add_(a)


@merge_method("add_difference", inputs=("A", "B", "C"),
              params=[Param("alpha", float, 1.0, (-1.0, 3.0), "strength of the difference B − C", blockwise=True)],
              label="Add difference", formula="A + α·(B − C)", finish=_add_difference_finish)
def add_difference(inputs, *, rng=None, base=None, stats=None, **_):
    """Add what B learned over C (e.g. an inpainting or style difference) to A."""
    a, b, c = inputs
    return a, b.sub_(c)


@merge_method("sum_twice", inputs=("A", "B", "C"), params=[ALPHA, BETA], label="Sum twice",
              formula="(A·(1−α) + B·α)·(1−β) + C·β",
              finish=lambda t, *, inplace, alpha, beta: _lerp(t[0], t[1], alpha, inplace).lerp_(t[2], beta))
def sum_twice(inputs, *, rng=None, base=None, stats=None, **_):
    """Weighted sum of A and B, then weighted sum of that with C."""
    a, b, c = inputs
    return a, b, c


def _triple_sum_finish(t, *, inplace, alpha, beta):
    a, b, c = t
    out = a.mul_(1 - alpha - beta) if inplace else a * (1 - alpha - beta)
    return out.add_(b.mul_(alpha) if inplace else b * alpha).add_(c.mul_(beta) if inplace else c * beta)


@merge_method("triple_sum", inputs=("A", "B", "C"),
              params=[Param("alpha", float, 1 / 3, (-1.0, 2.0), "weight of B", blockwise=True),
                      Param("beta", float, 1 / 3, (-1.0, 2.0), "weight of C", blockwise=True)],
              label="Triple sum", formula="A·(1−α−β) + B·α + C·β", finish=_triple_sum_finish)
def triple_sum(inputs, *, rng=None, base=None, stats=None, **_):
    """Three-way weighted sum; A gets what α and β leave."""
    a, b, c = inputs
    return a, b, c

"""Soups and task arithmetic: averages of the models, or of their differences from a base."""
from __future__ import annotations

from ..core.errors import InputError
from .common import LAMBDA, WEIGHTS, _lambda_finish, _model_weights, _weighted_sum
from .spec import merge_method


@merge_method("uniform_soup", many=True, params=[], label="Uniform soup", formula="mean(θi)")
def uniform_soup(models, *, base=None, stats=None, rng=None):
    """The plain average of all models (a "model soup")."""
    return _weighted_sum(models, [1.0 / models.shape[0]] * models.shape[0])


@merge_method("weighted_soup", many=True, params=[WEIGHTS], label="Weighted soup", formula="Σ wi·θi / Σ wi")
def weighted_soup(models, *, weights, base=None, stats=None, rng=None):
    """Average with one weight per model."""
    w = _model_weights(weights, models.shape[0], models)
    total = sum(w)
    if total == 0:
        raise InputError("The model weights sum to 0: a weighted soup needs a non-zero total.")
    return _weighted_sum(models, [x / total for x in w])


@merge_method("task_arithmetic", many=True, base="required", params=[LAMBDA, WEIGHTS], label="Task arithmetic",
              formula="θ0 + λ·Σ wi·δi",
              finish=_lambda_finish)
def task_arithmetic(models, *, base, weights, rng=None, stats=None, **_):
    """Add every model's difference from the base, weighted, scaled by λ."""
    deltas = models.sub_(base)
    return base, _weighted_sum(deltas, _model_weights(weights, models.shape[0], models))

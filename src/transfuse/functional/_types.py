"""Typed option values shared by the functional losses.

Each alias is ``Annotated[<type>, pydantic.Field(<constraints>)]``. The annotation changes
nothing when a function is called directly (the functions keep their own runtime checks),
but the loss registry builds each registered loss's options model from these annotations,
so a config with ``temperature: 0`` or ``beta: -1`` fails when it is loaded, naming the
option, the value and the constraint.

* :data:`Temperature` -- a softmax temperature: a finite float > 0.
* :data:`Positive` -- a finite float > 0 (``eps``, an attention exponent ``p``).
* :data:`NonNegative` -- a finite float >= 0 (the inner weights of a loss: ``alpha``,
  ``beta``, ``gamma``, ``distance_weight``; 0 switches a term off).
* :data:`Probability` -- a finite float in ``[0, 1]`` (a momentum, a mixing fraction).
* :data:`LabelSmoothing` -- a float in ``[0, 1)`` (1 would erase the label).
* :data:`PositiveInt` -- an int >= 1 (a dimension, a count).
* :data:`Reduction` -- ``"mean"`` (one scalar) or ``"none"`` (the per-position values).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

#: A softmax temperature: finite and > 0.
Temperature = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: A finite float > 0.
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: A finite float >= 0.
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
#: A finite float in [0, 1].
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
#: A float in [0, 1).
LabelSmoothing = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
#: An int >= 1.
PositiveInt = Annotated[int, Field(ge=1)]
#: How a position-wise loss reduces: ``"mean"`` (through :func:`~transfuse.functional.reduce_positions`)
#: or ``"none"`` (the per-position values).
Reduction = Literal["mean", "none"]

__all__ = ["LabelSmoothing", "NonNegative", "Positive", "PositiveInt", "Probability", "Reduction", "Temperature"]

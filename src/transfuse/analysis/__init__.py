"""What moved: accuracy, agreement, calibration (ECE) and flips of model predictions.

``predict`` turns a model and a data set into ``(logits, targets)``; the metrics are pure
functions of those tensors.
"""

from .metrics import accuracy, agreement, expected_calibration_error, flips
from .predict import predict

__all__ = ["accuracy", "agreement", "expected_calibration_error", "flips", "predict"]

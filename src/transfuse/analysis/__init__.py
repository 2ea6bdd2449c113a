"""What moved: accuracy, agreement, calibration (ECE) and flips of model predictions.

``predict`` turns a model and a data set into ``(logits, targets)``; the metrics are pure
functions of those tensors; ``compare`` puts two models side by side on one data set;
``cluster_accuracy`` scores a clustering of novel classes (Hungarian matching).
"""

from .clustering import cluster_accuracy, cluster_mapping, novel_class_scores
from .compare import compare, compare_logits
from .metrics import accuracy, agreement, expected_calibration_error, flips, prediction_flips
from .predict import predict
from .tokens import scored_positions, token_agreement, token_scores

__all__ = [
    "accuracy", "agreement", "cluster_accuracy", "cluster_mapping", "novel_class_scores", "compare", "compare_logits", "expected_calibration_error", "flips", "prediction_flips",
    "predict", "scored_positions", "token_agreement", "token_scores",
]

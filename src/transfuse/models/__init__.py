"""The model zoo: small classifiers for tests and benchmarks, and loaders for outside models.

Registered names (``MODELS``): ``mlp``, ``cnn``, ``resnet``, ``wrn``, ``vit``, ``hf``, ``timm``,
``torchvision``. Every built-in model maps ``(B, *input_shape)`` to logits
``(B, num_classes)`` and declares ``feature_layer`` (penultimate embedding ``(B, D)``),
``hint_layer`` (the middle stage, FitNets' hint) and ``map_layer`` (the last map before
pooling, SP's layer) as module paths; see ``docs/models-and-data.md``.
"""

from . import causal_lm, cnn, hf, mlp, resnet, vision, vit  # noqa: F401  (importing registers the models)
from .base import MODELS
from .build import build_model
from .cnn import SmallCNN
from .hf import HFClassifier
from .mlp import MLP
from .resnet import CifarResNet, WideResNet
from .vit import TinyViT

__all__ = ["MODELS", "MLP", "CifarResNet", "HFClassifier", "SmallCNN", "TinyViT", "WideResNet", "build_model"]

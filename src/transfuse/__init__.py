"""transfuse: move what trained models know into other models."""

__version__ = "0.1.0"

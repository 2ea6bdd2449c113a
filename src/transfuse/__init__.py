"""transfuse: move what trained models know into other models.

The Python API in one screen::

    import transfuse
    from transfuse.losses import KD, CrossEntropy

    distiller = transfuse.Distiller(student, transfuse.Teacher(teacher),
                                    [transfuse.Term("ce", CrossEntropy(), 0.1),
                                     transfuse.Term("kd", KD(temperature=4.0), 0.9)])
    loss = distiller(batch, step)["loss"]          # batch = {"input", "target", "index"}

    cfg = transfuse.load_config("configs/digits/kd.yaml", ["train.steps=200"])
    summary = transfuse.run(cfg, out_dir="runs/kd")  # the whole pipeline, as `transfuse run`

Modules: ``functional`` (pure losses), ``losses`` (registered loss modules),
``models``, ``data``, ``analysis`` (accuracy, agreement, ECE, flips), ``taps``,
``teacher``, ``distiller``, ``engine``, ``config``, ``build``, ``run``.
"""

__version__ = "0.1.0"

from . import analysis, data, functional, losses, models  # noqa: E402  (registries fill on import)
from .config import RunConfig, load_config  # noqa: E402
from .distiller import Distiller, Term  # noqa: E402
from .engine import FitSettings, fit  # noqa: E402
from .run import run  # noqa: E402
from .taps import FeatureTaps  # noqa: E402
from .teacher import Teacher  # noqa: E402

__all__ = [
    "Distiller", "FeatureTaps", "FitSettings", "RunConfig", "Teacher", "Term", "__version__", "analysis", "data",
    "fit", "functional", "load_config", "losses", "models", "run",
]

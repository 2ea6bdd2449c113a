"""transfuse: move what trained models know into other models.

The Python API in one screen::

    import transfuse
    from transfuse.losses import LOSSES

    student = transfuse.Participant("student", student_net)                   # trainable
    teacher = transfuse.Participant("teacher", teacher_net, trainable=False)  # frozen
    distiller = transfuse.Distiller(
        [student, teacher],
        [transfuse.Term("ce", LOSSES.get("ce").build(), 0.1, input="student.logits", target=None),
         transfuse.Term("kd", LOSSES.get("kd").build(temperature=4.0), 0.9,
                        input="student.logits", target="teacher.logits")])
    loss = distiller(batch, step)["loss"]          # batch = {"input", "target", "index", "sample_id"}

    cfg = transfuse.load_config("configs/digits/kd.yaml", ["train.steps=200"])
    summary = transfuse.run(cfg, out_dir="runs/kd")  # the whole pipeline, as `transfuse run`

Modules: ``functional`` (pure losses and the one reduction), ``losses`` (registered loss
modules), ``participants`` and ``sources`` (who answers a batch), ``distiller``
(participants + terms), ``recipes`` (the inner step), ``engine`` (the one loop),
``schemes`` (dml, multi_teacher), ``cache`` (teacher outputs on disk), ``models``,
``data``, ``analysis`` (accuracy, agreement, ECE, flips), ``taps``, ``config``, ``build``,
``run``.
"""

from ._version import __version__  # noqa: E402

from . import analysis, data, functional, losses, models, schemes  # noqa: E402  (registries fill on import)
from .config import RunConfig, load_config  # noqa: E402
from .distiller import Distiller, Ref, Term  # noqa: E402
from .engine import FitSettings, fit  # noqa: E402
from .participants import Participant  # noqa: E402
from .recipes import DefaultRecipe, Recipe  # noqa: E402
from .run import run  # noqa: E402
from .sources import CachedOutputs, Ensemble, LearnedEnsemble  # noqa: E402
from .taps import FeatureTaps  # noqa: E402

__all__ = [
    "CachedOutputs", "DefaultRecipe", "Distiller", "Ensemble", "FeatureTaps", "LearnedEnsemble", "FitSettings", "Participant", "Recipe", "Ref",
    "RunConfig", "Term", "__version__", "analysis", "data", "fit", "functional", "load_config", "losses",
    "models", "run",
]

"""``negdpo study --config configs/phantom_study.yaml [--preset quick|medium|full]``: the whole chain on phantoms.

The phantom set has what no public data set has: the healthy twin of every positive. The study uses it to
score each part of the method with numbers. Modules, in the order the pipeline uses them:

* :mod:`~negdpo.study.config` — :class:`StudyConfig` and its loader (presets in configs/phantom_study.yaml);
* :mod:`~negdpo.study.variants` — row names, labels and the comparisons asked of them;
* :mod:`~negdpo.study.cache` — cached stages (``work_dir/<stage>/stage.json``) and worker processes;
* :mod:`~negdpo.study.data` — what the study reads from the phantom folder;
* :mod:`~negdpo.study.generators`, :mod:`~negdpo.study.clips`, :mod:`~negdpo.study.pairs`,
  :mod:`~negdpo.study.segmentation`, :mod:`~negdpo.study.stage2` — the stages;
* :mod:`~negdpo.study.tables`, :mod:`~negdpo.study.markdown`, :mod:`~negdpo.study.report`,
  :mod:`~negdpo.study.results` — the results contract and its renderings;
* :mod:`~negdpo.study.pipeline` — :func:`run_study`, the stages in order; :mod:`~negdpo.study.cli` — the command.
"""

from negdpo.study.cli import main
from negdpo.study.config import StudyConfig, load_study_config
from negdpo.study.pipeline import run_study

__all__ = ["StudyConfig", "load_study_config", "main", "run_study"]

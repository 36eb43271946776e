"""Equal-budget study of PromptIR, CPL (and its SPM/CPR ablation), PIP and DPPD (``cplfast study``).

:mod:`~cplfast.study.variants` defines what each variant trains, :mod:`~cplfast.study.runner` trains
and scores every (variant, seed) resumably, :mod:`~cplfast.study.report` turns the runs into tables,
intervals, verdicts and figures (:mod:`~cplfast.study.plots`).
"""

from .report import CLAIMS, PAPER_RESULTS, markdown, summarise, t_interval, verdict, write_report
from .runner import StudyConfig, run_dir, run_study, train_one
from .variants import BASELINE, DESCRIPTIONS, RECIPE, VARIANTS, variant_config

__all__ = [
    "BASELINE", "CLAIMS", "DESCRIPTIONS", "PAPER_RESULTS", "RECIPE", "StudyConfig", "VARIANTS", "markdown",
    "run_dir", "run_study", "summarise", "t_interval", "train_one", "variant_config", "verdict", "write_report",
]

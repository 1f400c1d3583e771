"""Multi-seed experiments: a resumable runner of configs x seeds, paired statistics, plots."""
from moejax.experiment.runner import RunResult, Study, StudyResult  # noqa: F401
from moejax.experiment.stats import Comparison, Summary, compare, summarize  # noqa: F401

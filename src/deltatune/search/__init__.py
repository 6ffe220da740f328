"""Hyperparameter search with Optuna: a run config's ``search:`` space, one training run per trial."""

from .report import TrialRecord, TuneResult
from .runner import tune
from .space import Param, TuneConfig, load_tune_config

__all__ = ["Param", "TrialRecord", "TuneConfig", "TuneResult", "load_tune_config", "tune"]

"""deltatune: fine-tune pre-trained transformers fully or with PEFT, and account for it honestly."""

__version__ = "0.1.0"

from . import assets  # dt.assets.model_path(): the bundled models, offline
from .core.accounting import ParameterReport, parameter_report
from .core.errors import AdapterFileError, ConfigError, DeltatuneError, MergeError, TargetError
from .core.method import MethodConfig, config_from_dict, registered
from .core.verbs import (active_adapters, adapter_state_dict, apply, delete_adapter,
                         disable_adapters, merge, merge_and_unload, set_adapter, unload, unmerge)
from .hf.trainer import TrainerCallback
from .io.adapter_files import load_adapter, read_adapter, save_adapter
from .methods import *  # noqa: F401,F403  (every method's config class, e.g. LoraConfig)
from .methods import __all__ as _method_names

__all__ = [*_method_names,
    "AdapterFileError", "ConfigError", "DeltatuneError", "MergeError",
    "MethodConfig", "ParameterReport", "TrainerCallback", "TargetError", "active_adapters", "adapter_state_dict",
    "apply", "config_from_dict", "delete_adapter", "disable_adapters", "load_adapter", "merge",
    "merge_and_unload", "parameter_report", "read_adapter", "registered", "save_adapter",
    "assets", "set_adapter", "tune", "unload", "unmerge",
]


def __getattr__(name: str):
    """``deltatune.tune``, imported on first use: the search pulls in Optuna and the training loop."""
    if name == "tune":
        from .search import tune

        return tune
    raise AttributeError(f"module 'deltatune' has no attribute '{name}'")

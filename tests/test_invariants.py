"""Shared invariants every method must keep, on every family in the case table."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from cases import case_params
from deltatune.core.layer import ModuleCopy
from deltatune.core.method import method_for
from tiny import ROUND_TRIP, assert_close_ulps, build, inputs, output, perturb


def adapted(case, family):
    model = build(family)
    batch = inputs(family)
    base = output(model, batch)
    dt.apply(model, case.config(family))
    return model, batch, base


@pytest.mark.parametrize("case,family", case_params(lambda c: c.identity_at_init))
def test_fresh_adapter_leaves_outputs_unchanged(case, family):
    model, batch, base = adapted(case, family)
    # exact: every such method starts by adding an exact zero (a zero factor, a zero difference,
    # a scale of one), so no rounding enters on any CPU kernel (PiSSA's once left 1e-6 on T5)
    assert torch.equal(output(model, batch), base)


@pytest.mark.parametrize("case,family", case_params())
def test_a_step_changes_only_the_trainable_set(case, family):
    model, batch, _ = adapted(case, family)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the adapter trains nothing"
    model(**batch).logits.float().pow(2).mean().backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached <= trainable
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


@pytest.mark.parametrize("case,family", case_params(lambda c: c.exact_when_disabled))
def test_disabled_adapter_gives_base_outputs_exactly(case, family):
    model, batch, base = adapted(case, family)
    perturb(model)
    assert not torch.allclose(output(model, batch), base, atol=1e-4)  # trained: far past rounding
    with dt.disable_adapters(model):
        assert torch.equal(output(model, batch), base)


@pytest.mark.parametrize("case,family", case_params())
def test_save_load_round_trip(case, family, tmp_path):
    model, batch, _ = adapted(case, family)
    perturb(model)
    expected = output(model, batch)
    dt.save_adapter(model, tmp_path / "adapter")
    fresh = build(family)
    dt.load_adapter(fresh, tmp_path / "adapter")
    assert_close_ulps(output(fresh, batch), expected)
    stored = dt.parameter_report(model).stored_bytes
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert stored <= size <= stored * 1.01 + 16 * 1024


@pytest.mark.parametrize("case,family", case_params(lambda c: c.mergeable))
def test_merge_unmerge_and_unload_agree(case, family):
    model, batch, _ = adapted(case, family)
    perturb(model)
    expected = output(model, batch)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    dt.merge(model)
    assert_close_ulps(output(model, batch), expected)
    with pytest.raises(dt.MergeError, match="already merged|merge again"):
        dt.merge(model)
    dt.unmerge(model)
    for name, weight in base_weights.items():
        assert_close_ulps(model.get_parameter(name), weight, ROUND_TRIP)
    plain = dt.merge_and_unload(model)
    assert not any(type(m).__module__.startswith("deltatune") for m in plain.modules())
    assert_close_ulps(output(plain, batch), expected)


@pytest.mark.parametrize("case,family", case_params(lambda c: not c.mergeable))
def test_non_mergeable_methods_refuse_to_merge(case, family):
    model, _, _ = adapted(case, family)
    with pytest.raises(dt.MergeError, match="cannot be merged"):
        dt.merge(model)


@pytest.mark.parametrize("case,family", case_params())
def test_report_counts_match_the_saved_file(case, family, tmp_path):
    """``stored`` and its bytes are counted from the file save_adapter writes, read back with
    safetensors: not from the in-memory tensors the report itself counts."""
    model, _, _ = adapted(case, family)
    report = dt.parameter_report(model)
    dt.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert report.stored == sum(t.numel() for t in saved.values())
    assert report.stored_bytes == sum(t.numel() * t.element_size() for t in saved.values())
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    tensors = dt.adapter_state_dict(model)
    frozen = case.frozen_in_stored(model) if case.frozen_in_stored else _frozen_but_stored(model, tensors)
    assert report.trainable == report.stored + report.not_stored - frozen


def _frozen_but_stored(model, tensors) -> int:
    """Stored tensors that are not trainable parameters (e.g. folded prefixes computed on save)."""
    trainable_ids = {id(p) for p in model.parameters() if p.requires_grad}
    return sum(t.numel() for t in tensors.values() if id(t) not in trainable_ids)


@pytest.mark.parametrize("case,family", case_params())
def test_a_module_is_adapted_or_trained_in_full_never_both(case, family):
    """The engine checks every method's modules against modules_to_save: a clash is refused
    before anything changes, or the method leaves that module to the trained copy."""
    model = build(family)
    config = case.config(family)
    modules = dict(model.named_modules())
    wrapped = [name for name in method_for(config).plan(model) or [] if name in modules]
    if not wrapped:
        pytest.skip("this config wraps no module of the base model (it trains the base weights in "
                    "place, or holds virtual tokens at the root)")
    keys = sorted(model.state_dict())
    saved = dataclasses.replace(config, modules_to_save=[wrapped[0]])
    try:
        dt.apply(model, saved)
    except dt.ConfigError as error:
        assert "overlaps" in str(error) and wrapped[0] in str(error)
        assert sorted(model.state_dict()) == keys and not hasattr(model, "_deltatune_state")
        return
    assert wrapped[0] not in list(method_for(saved).plan(build(family)))  # the method left it alone
    assert [type(d) for d in model.get_submodule(wrapped[0]).deltas.values()] == [ModuleCopy]


def test_a_method_name_is_registered_once():
    from deltatune.core.method import Method, register

    lora = dt.registered()["lora"]
    impostor = type("Lora", (Method,), {"name": "lora", "config_class": lora.config_class,
                                        "family": "additive", "__module__": "somewhere.else"})
    with pytest.raises(ValueError, match="method name 'lora' is taken by deltatune.methods.lora.Lora"):
        register(impostor)
    assert dt.registered()["lora"] is lora and lora.config_class.method == "lora"

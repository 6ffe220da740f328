"""DoRA (LoraConfig(use_dora=True)): the magnitude's start, the output and merge formulas worked
out by hand, counts, and parity with peft 0.21.2 both ways (files and gradients)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.verbs import merged_adapters
from tiny import HIDDEN, LAYERS, ROUND_TRIP, Net, assert_close_ulps, build, inputs, output, perturb

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft's notices


def dora(layer):
    return layer.deltas["default"]


# --- the formula -------------------------------------------------------------------------

def test_magnitude_starts_at_the_row_norms_of_w0():
    model = dt.apply(build("gpt2"), dt.LoraConfig(r=4, use_dora=True, target_modules=["c_attn", "wte"]))
    c_attn, wte = model.transformer.h[0].attn.c_attn, model.transformer.wte
    # Conv1D stores W0 as (in, out) and an embedding as (vocab, dim): one norm per output feature.
    torch.testing.assert_close(dora(c_attn).lora_magnitude_vector.detach(), c_attn.weight.norm(dim=0))
    torch.testing.assert_close(dora(wte).lora_magnitude_vector.detach(), wte.weight.norm(dim=0))
    assert dora(c_attn).lora_magnitude_vector.shape == (3 * HIDDEN,)


def test_output_is_the_rescaled_direction():
    torch.manual_seed(0)
    model = dt.apply(Net(), dt.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["proj"]))
    perturb(model, scale=0.5)
    delta, W0, b = dora(model.proj), model.proj.weight.detach(), model.proj.bias.detach()
    A, B, m = delta.lora_A.weight.detach(), delta.lora_B.weight.detach(), delta.lora_magnitude_vector.detach()
    direction = W0 + 2.0 * B @ A
    W = m[:, None] * direction / direction.norm(dim=1, keepdim=True)  # m / ||W0 + s B A||_c (W0 + s B A)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x).detach(), x @ W.T + b)
    dt.merge(model)
    torch.testing.assert_close(model.proj.base_layer.weight.detach(), W)
    dt.unmerge(model)
    assert_close_ulps(model.proj.base_layer.weight.detach(), W0, ROUND_TRIP)


def test_the_weight_norm_takes_no_gradient():
    """Section 4.3 of the paper: n is a constant in the backward pass, so B's gradient is the
    plain LoRA one times m/n."""
    torch.manual_seed(0)
    model = dt.apply(Net(), dt.LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["proj"]))
    perturb(model, scale=0.5)
    delta, x = dora(model.proj), torch.randn(4, 6)
    model(x).sum().backward()
    n = delta.weight_norm(model.proj.weight).detach()
    factor = delta.lora_magnitude_vector.detach() / n
    # L = sum(h): dL/dB = (m/n) s sum_batch (A x)^T, with s = alpha/r = 1 and n held still
    expected = factor[:, None] * (torch.ones(4, 5).T @ (x @ delta.lora_A.weight.detach().T))
    torch.testing.assert_close(delta.lora_B.weight.grad, expected)


def test_a_dora_adapter_merges_first_on_its_module_or_not_at_all():
    model = build("bert")
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["query"]), adapter_name="plain")
    dt.apply(model, dt.LoraConfig(r=2, use_dora=True, target_modules=["query"]), adapter_name="dora")
    perturb_all(model)
    batch = inputs("bert")
    dt.set_adapter(model, ["plain", "dora"])  # DoRA would rescale the weight the plain merge changed
    with pytest.raises(dt.MergeError) as info:
        dt.merge(model)
    assert str(info.value) == ("adapter 'dora' rescales the original weight, which 'plain' has already changed by "
                               "merging first.\n  fix: make 'dora' the first active adapter, or merge it alone.")
    assert merged_adapters(model) == []
    dt.set_adapter(model, ["dora", "plain"])
    expected = output(model, batch)
    dt.merge(model)
    assert_close_ulps(output(model, batch), expected)


def perturb_all(model):
    """perturb() every adapter's parameters, trainable now or not."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".deltas." in name:
                param.add_(0.3 * torch.randn(param.shape, generator=g))


# --- counts ------------------------------------------------------------------------------

@pytest.mark.parametrize("family,targets,d_in,d_out,count", [
    ("bert", ["query", "value"], HIDDEN, HIDDEN, 1152),  # 2 layers x 2 x (4 (32 + 32) + 32)
    ("gpt2", ["c_attn"], HIDDEN, 3 * HIDDEN, 1216),      # 2 layers x (4 (32 + 96) + 96)
])
def test_counts_are_r_times_d_in_plus_d_out_plus_d_out(family, targets, d_in, d_out, count, tmp_path):
    model = dt.apply(build(family), dt.LoraConfig(r=4, use_dora=True, target_modules=targets))
    report = dt.parameter_report(model)
    assert report.trainable == report.stored == LAYERS * len(targets) * (4 * (d_in + d_out) + d_out) == count
    assert report.not_stored == 0 and report.stored_bytes == 4 * count
    _, tensors = dt.read_adapter(dt.save_adapter(model, tmp_path / "adapter"))
    magnitudes = {k: t for k, t in tensors.items() if k.endswith(".lora_magnitude_vector")}
    assert len(magnitudes) == LAYERS * len(targets) and all(t.shape == (d_out,) for t in magnitudes.values())


# --- parity with Hugging Face peft -------------------------------------------------------

PARITY = [
    pytest.param("bert", {"target_modules": ["query", "value"]}, id="bert"),
    pytest.param("bert", {"target_modules": ["word_embeddings", "query"], "use_rslora": True}, id="bert-embedding-rslora"),
    pytest.param("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True}, id="gpt2-conv1d"),
]


def peft_dora(family: str, kwargs: dict) -> nn.Module:
    return peft.get_peft_model(build(family), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **kwargs)).eval()


def ours(family: str, kwargs: dict) -> nn.Module:
    kwargs = {k: v for k, v in kwargs.items() if k != "fan_in_fan_out"}  # found from the model here
    return dt.apply(build(family), dt.LoraConfig(r=4, lora_alpha=8, use_dora=True, **kwargs))


@pytest.mark.parametrize("family,kwargs", PARITY)
def test_a_peft_dora_adapter_loads_with_equal_outputs(family, kwargs, tmp_path):
    theirs = peft_dora(family, kwargs)
    perturb(theirs, scale=0.3)
    theirs.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    loaded = dt.load_adapter(build(family), tmp_path / "peft")
    batch = inputs(family)
    assert (output(theirs, batch) - output(build(family), batch)).abs().max() > 1e-4  # it changed the outputs
    assert_close_ulps(output(loaded, batch), output(theirs, batch))


@pytest.mark.parametrize("family,kwargs", PARITY)
def test_a_dora_adapter_written_for_peft_loads_there_with_equal_outputs(family, kwargs, tmp_path):
    model = ours(family, kwargs)
    perturb(model, scale=0.3)  # B != 0, m != ||W0||
    dt.save_adapter(model, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(build(family), tmp_path / "peft").eval()
    magnitudes = [k for k in peft.get_peft_model_state_dict(theirs) if "lora_magnitude_vector" in k]
    assert magnitudes and all(k.endswith(".lora_magnitude_vector") for k in magnitudes)  # peft's file keys
    batch = inputs(family)
    assert_close_ulps(output(theirs, batch), output(model, batch))


@pytest.mark.parametrize("family,kwargs", PARITY)
def test_starts_and_gradients_match_peft_with_dropout(family, kwargs):
    """The same magnitude at start; in training, with dropout on the adapter's input, the same
    outputs (same dropout masks: one draw per layer in both) and the same gradients."""
    mine, theirs = ours(family, {**kwargs, "lora_dropout": 0.2}), peft_dora(family, {**kwargs, "lora_dropout": 0.2})
    peft.set_peft_model_state_dict(theirs, {f"base_model.model.{k}": v for k, v in dt.adapter_state_dict(mine).items()})
    named = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(theirs).items()}
    for key, tensor in dt.adapter_state_dict(mine).items():
        if key.endswith("lora_magnitude_vector"):
            torch.testing.assert_close(tensor.detach(), named[key], atol=0, rtol=0)
    perturb(mine, scale=0.3)
    peft.set_peft_model_state_dict(theirs, {f"base_model.model.{k}": v for k, v in dt.adapter_state_dict(mine).items()})
    outs, grads = [], []
    for model in (mine, theirs):
        model.train()
        torch.manual_seed(5)
        logits = model(**inputs(family)).logits
        logits.pow(2).mean().backward()
        outs.append(logits.detach())
        grads.append({same_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert_close_ulps(outs[0], outs[1])
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) > 0
    for name, grad in grads[0].items():  # tiny models give gradients of 1e-8 to 1: compare each to its size
        torch.testing.assert_close(grad, grads[1][name], atol=1e-4 * grad.abs().max().item(), rtol=1e-4, msg=name)


def same_name(name: str) -> str:
    """A parameter's name in either model, as ours without the wrapper's parts (lora_A.weight ...)."""
    name = name.removeprefix("base_model.model.").replace(".deltas.default.", ".").replace(".default", "")
    return name.removesuffix(".lora_magnitude_vector.weight").removesuffix(".lora_magnitude_vector") + (
        ".magnitude" if "lora_magnitude_vector" in name else "")

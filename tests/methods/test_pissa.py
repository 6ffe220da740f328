"""PiSSA (LoraConfig(init="pissa" | "pissa_niter_N")): the start from W0's singular vectors, the
untouched base, the rank-2r plain LoRA it saves as, and parity with peft 0.21.2 both ways."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
import tiny
from deltatune.io.adapter_files import load_adapter_state_dict
from deltatune.methods.lora import PlainLora
from tiny import assert_close_ulps, build, inputs, output, perturb

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft's notices


def Net(d_in: int = 64, d_out: int = 48) -> nn.Module:  # room for the top-r singular vectors
    return tiny.Net(d_in, d_out)


def start(layer) -> tuple[torch.Tensor, torch.Tensor]:
    delta = layer.deltas["default"]
    return delta.lora_A.weight.detach(), delta.lora_B.weight.detach()


# --- the start ---------------------------------------------------------------------------

@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_and_b_start_from_the_top_r_singular_vectors(use_rslora):
    torch.manual_seed(0)
    model = dt.apply(Net(), dt.LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, init="pissa",
                                          target_modules=["proj"]))
    s = 8 / (2 if use_rslora else 4)
    U, S, Vh = torch.linalg.svd(model.proj.weight.detach(), full_matrices=False)
    A, B = start(model.proj)
    torch.testing.assert_close(A, torch.diag((S[:4] / s).sqrt()) @ Vh[:4])  # A = sqrt(S_r / s) V_r^T
    torch.testing.assert_close(B, U[:, :4] @ torch.diag((S[:4] / s).sqrt()))  # B = U_r sqrt(S_r / s)
    torch.testing.assert_close(s * B @ A, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4])  # W0's principal part


def test_starts_as_peft_does_on_conv1d():
    """GPT-2's Conv1D stores W0 as (in, out): the singular vectors are those of W0^T, as peft takes them."""
    model = dt.apply(build("gpt2"), dt.LoraConfig(r=4, lora_alpha=8, init="pissa", target_modules=["c_attn"]))
    theirs = peft.get_peft_model(build("gpt2"), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                               target_modules=["c_attn"], fan_in_fan_out=True))
    A, B = start(model.transformer.h[1].attn.c_attn)
    layer = theirs.base_model.model.transformer.h[1].attn.c_attn
    assert_close_ulps(A, layer.lora_A["default"].weight.detach())
    assert_close_ulps(B, layer.lora_B["default"].weight.detach())


def test_the_randomised_start_is_close_to_the_exact_one_on_a_low_rank_weight():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # rank 4 with singular values ~1 to ~10, plus noise of 1e-4
        net.proj.weight.copy_(torch.randn(48, 4) @ torch.diag(torch.tensor([10.0, 5.0, 2.0, 1.0])) @
                              torch.linalg.qr(torch.randn(64, 4)).Q.T + 1e-4 * torch.randn(48, 64))
    principal = {}
    for init in ("pissa", "pissa_niter_4"):
        model = dt.apply(copy.deepcopy(net), dt.LoraConfig(r=4, lora_alpha=4, init=init, target_modules=["proj"]))
        A, B = start(model.proj)
        principal[init] = B @ A  # s = 1
    assert (principal["pissa"] - net.proj.weight).abs().max() < 1e-3  # the noise is all that is left
    # an approximation, not rounding: what 4 power iterations miss is of the order of the noise (1e-5 of the top)
    top = principal["pissa"].abs().max().item()
    torch.testing.assert_close(principal["pissa_niter_4"], principal["pissa"], atol=1e-5 * top, rtol=0)


# --- the base stays the original ---------------------------------------------------------

def test_a_fresh_adapter_and_a_disabled_one_give_the_original_base():
    base, batch = build("gpt2"), inputs("gpt2")
    expected, weights = output(base, batch), {k: v.clone() for k, v in base.state_dict().items()}
    model = dt.apply(build("gpt2"), dt.LoraConfig(r=4, init="pissa", target_modules=["c_attn", "c_fc"]))
    assert_close_ulps(output(model, batch), expected)
    perturb(model)
    assert (output(model, batch) - expected).abs().max() > 1e-3
    with dt.disable_adapters(model):
        assert torch.equal(output(model, batch), expected)
    plain = dt.unload(model)  # W0 itself was never rewritten
    assert all(torch.equal(v, weights[k]) for k, v in plain.state_dict().items())


def test_matches_peft_training_on_the_residual_base():
    """peft writes W0 - s B0 A0 into the base and adds s B A; the same A and B here give the same
    outputs without touching W0."""
    mine = dt.apply(build("bert"), dt.LoraConfig(r=4, lora_alpha=8, init="pissa", target_modules=["query", "value"]))
    theirs = peft.get_peft_model(build("bert"), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                               target_modules=["query", "value"])).eval()
    perturb(mine, scale=0.3)
    tensors = {k: v for k, v in dt.adapter_state_dict(mine).items()}
    trained = {f"base_model.model.{k}": v[:4] if ".lora_A." in k else v[:, :4] for k, v in tensors.items()}
    peft.set_peft_model_state_dict(theirs, trained)
    batch = inputs("bert")
    assert (output(theirs, batch) - output(build("bert"), batch)).abs().max() > 1e-4  # it changed the outputs
    assert_close_ulps(output(mine, batch), output(theirs, batch))


# --- the file: a plain rank-2r LoRA ------------------------------------------------------

@pytest.mark.parametrize("use_rslora,alpha", [(False, 16), (True, 8 * 2 ** 0.5)])
def test_saves_as_a_plain_rank_2r_lora_and_reloads_with_equal_outputs(use_rslora, alpha, tmp_path):
    model = dt.apply(build("bert"), dt.LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, init="pissa",
                                                  target_modules=["query", "value"]))
    perturb(model)
    batch = inputs("bert")
    expected = output(model, batch)
    description, tensors = dt.read_adapter(dt.save_adapter(model, tmp_path / "adapter"))
    saved = description["config"]
    assert (saved["r"], saved["lora_alpha"], saved["init"]) == (8, alpha, "kaiming")  # the same scaling s
    layer = model.bert.encoder.layer[0].attention.self.query
    A, B = start(layer)
    A0, B0 = layer.deltas["default"].lora_A0, layer.deltas["default"].lora_B0
    key = "bert.encoder.layer.0.attention.self.query"
    assert torch.equal(tensors[f"{key}.lora_A.weight"], torch.cat([A, A0]))      # A' = [A; A0]
    assert torch.equal(tensors[f"{key}.lora_B.weight"], torch.cat([B, -B0], 1))  # B' = [B, -B0]
    loaded = dt.load_adapter(build("bert"), tmp_path / "adapter")
    assert type(loaded.bert.encoder.layer[0].attention.self.query.deltas["default"]) is PlainLora
    assert_close_ulps(output(loaded, batch), expected)
    report = dt.parameter_report(model)
    assert report.trainable == 2 * 2 * 4 * (32 + 32) and report.stored == 2 * report.trainable
    assert report.not_stored == 0


def test_its_own_file_restores_a_and_b_and_the_start(tmp_path):
    """A run resumes a PiSSA adapter from its file: the rank-2r tensors split back into B, A and B0, A0."""
    model = dt.apply(build("bert"), dt.LoraConfig(r=4, init="pissa_niter_2", target_modules=["query"]))
    perturb(model)
    batch, saved = inputs("bert"), {k: v.detach().clone() for k, v in dt.adapter_state_dict(model).items()}
    expected = output(model, batch)
    torch.manual_seed(123)  # another randomised start, overwritten by the file
    again = dt.apply(build("bert"), dt.LoraConfig(r=4, init="pissa_niter_2", target_modules=["query"]))
    load_adapter_state_dict(again, saved)  # what the training loop does with its best adapter
    assert_close_ulps(output(again, batch), expected)
    assert all(torch.equal(v, saved[k]) for k, v in dt.adapter_state_dict(again).items())


@pytest.mark.parametrize("family,targets,use_dora", [
    ("bert", ["query", "value"], False), ("gpt2", ["c_attn"], False), ("gpt2", ["c_attn", "c_proj"], True)])
def test_the_file_written_for_peft_loads_there_with_equal_outputs(family, targets, use_dora, tmp_path):
    model = dt.apply(build(family), dt.LoraConfig(r=4, lora_alpha=8, init="pissa", use_dora=use_dora,
                                                  target_modules=targets))
    perturb(model)
    dt.save_adapter(model, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"], config["use_dora"]) == (8, 16, True, use_dora)
    theirs = peft.PeftModel.from_pretrained(build(family), tmp_path / "peft").eval()
    batch = inputs(family)
    assert (output(theirs, batch) - output(build(family), batch)).abs().max() > 1e-4
    assert_close_ulps(output(theirs, batch), output(model, batch))


def test_a_peft_pissa_adapter_converted_by_peft_loads_with_equal_outputs(tmp_path):
    theirs = peft.get_peft_model(build("gpt2"), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                               target_modules=["c_attn"], fan_in_fan_out=True))
    theirs.peft_config["default"].init_lora_weights = True  # how peft's docs save the start
    theirs.save_pretrained(str(tmp_path / "start"))
    theirs.peft_config["default"].init_lora_weights = "pissa"
    perturb(theirs)
    theirs.eval().save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "start"))
    loaded = dt.load_adapter(build("gpt2"), tmp_path / "peft")  # onto the original base, not the residual
    batch = inputs("gpt2")
    assert_close_ulps(output(loaded, batch), output(theirs, batch))


def test_an_unconverted_peft_pissa_adapter_is_refused(tmp_path):
    theirs = peft.get_peft_model(build("bert"), peft.LoraConfig(r=2, init_lora_weights="pissa_niter_2",
                                                               target_modules=["query"]))
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(dt.AdapterFileError, match="path_initial_model_for_weight_conversion"):
        dt.load_adapter(build("bert"), tmp_path / "peft")


# --- refusals ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"init": "pisa"}, r"lora\.init = 'pisa' is not a start LoRA knows"),
    ({"init": "pissa_niter_x"}, r"lora\.init = 'pissa_niter_x'"),
])
def test_unknown_starts_are_refused_naming_the_choices(kwargs, message):
    with pytest.raises(dt.ConfigError, match=message) as info:
        dt.LoraConfig(**kwargs)
    assert "pissa_niter_N" in str(info.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"r": 4, "target_modules": ["word_embeddings", "query"]}, "cannot start the embedding 'bert.embeddings.word_embeddings'"),
    ({"r": 33, "target_modules": ["query"]}, "lora.r = 33 is more than the 32 singular vectors"),
])
def test_targets_pissa_cannot_start_are_refused_before_anything_changes(kwargs, message):
    model = build("bert")
    keys = sorted(model.state_dict())
    with pytest.raises(dt.ConfigError, match=message):
        dt.apply(model, dt.LoraConfig(init="pissa", **kwargs))
    assert sorted(model.state_dict()) == keys


# --- in a comparison ---------------------------------------------------------------------

def test_compare_runs_dora_and_pissa_as_rows_of_their_own(tmp_path):
    import yaml

    from deltatune.compare.config import load_compare_config
    from deltatune.compare.runner import grid

    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "seeds": [7], "methods": [
        "lora", {"method": "lora", "use_dora": True}, {"method": "lora", "init": "pissa_niter_4"},
        {"method": "lora", "init": "pissa", "use_dora": True, "loraplus_lr_ratio": 16},
        {"method": "lora", "use_rslora": True}]}))
    config = load_compare_config(path)
    assert [c.key for c in grid(config)] == ["lora-seed7", "dora-seed7", "pissa-seed7", "pissa-dora+16-seed7",
                                             "rslora-seed7"]
    run = config.run_config(config.methods[1], 7, None, None, tmp_path, 1e-3)
    assert run.method == dt.LoraConfig(use_dora=True)

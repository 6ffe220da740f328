"""training.precision: auto chosen for the hardware, a lean bf16 base, fp32 for what trains."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from safetensors.torch import load_file

import deltatune as dt
import tiny
from cases import CASES
from deltatune.core.errors import ConfigError
from deltatune.train import precision
from deltatune.train.config import load_config
from deltatune.train.loop import train
from deltatune.train.setup import setup

#: bf16 keeps 8 significant bits: one rounding is at most 2^-9 of the value, one ulp 2^-8
BF16_ULP = 2.0 ** -8


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                       (False, False, "fp32")])
def test_auto_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert precision.resolve("auto", cpu) == expected
    assert precision.describe("auto", cpu).startswith(f"precision: {expected} (auto: this CPU has")
    assert precision.resolve("fp32", cpu) == "fp32" and precision.resolve("bf16", cpu) == "bf16"


def test_fp16_on_a_cpu_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        precision.resolve("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="'fp8' is not one of auto, fp32, bf16, fp16"):
        precision.resolve("fp8", torch.device("cpu"))


@pytest.mark.parametrize("value, expected", [("no", "fp32"), ("false", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_mixed_precision_is_read_as_precision(value, expected):
    """accelerate's key and values; `false` (no mixed precision) reads as accelerate's "no"."""
    assert load_config(None, [f"training.mixed_precision={value}"]).training.precision == expected


def _lean(case, family):
    model = dt.apply(tiny.build(family), case.config(family))
    precision.hold_frozen(model, "bf16")
    return precision.autocast_forward(model, "bf16", torch.device("cpu"))


@pytest.mark.parametrize("case, family", [pytest.param(c, f, id=f"{c.id}-{f}") for c in CASES for f in c.families])
def test_under_bf16_no_frozen_weight_is_fp32_and_everything_trained_is(case, family):
    """Every method on every family trains on a bf16 base: gradients reach every trained (fp32)
    parameter, and the outputs stay within bf16's rounding of the fp32 model's."""
    reference = dt.apply(tiny.build(family), case.config(family))
    model = _lean(case, family)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen if p.is_floating_point())  # none in full fine-tuning
    assert trained and all(p.dtype == torch.float32 for p in trained)
    batch = tiny.inputs(family)
    logits = model(**batch).logits
    assert logits.dtype == torch.float32  # outputs come back in fp32, as accelerate gives them
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    # a tiny model of 2 blocks rounds its activations to bf16 a few dozen times on the way
    expected = tiny.output(reference, batch)
    assert torch.allclose(tiny.output(model, batch), expected, rtol=0, atol=64 * BF16_ULP * expected.abs().max())


def test_a_copy_of_an_autocast_model_runs_the_copy():
    model = precision.autocast_forward(tiny.build("bert"), "bf16", torch.device("cpu"))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.classifier.weight.zero_()
        clone.classifier.bias.fill_(1.0)
    assert torch.equal(tiny.output(clone, tiny.inputs("bert")), torch.ones(2, 3))
    assert not torch.equal(tiny.output(model, tiny.inputs("bert")), torch.ones(2, 3))


@pytest.mark.parametrize("config", [dt.LoraConfig(r=4), dt.LoraConfig(r=4, use_dora=True), dt.IA3Config(),
                                    dt.VeraConfig(r=4)], ids=["lora", "dora", "ia3", "vera"])
def test_a_merge_into_a_bf16_base_computes_in_fp32_and_rounds_once(config):
    model = dt.apply(tiny.build("bert"), config)
    tiny.perturb(model)
    precision.hold_frozen(model, "bf16")
    exact = copy.deepcopy(model)
    for param in exact.parameters():  # the same bf16 base, widened to fp32 (exactly), merged in fp32
        param.data = param.data.float()
    dt.merge(exact)
    dt.merge(model)
    for name, weight in dict(model.named_parameters()).items():
        if name.endswith("base_layer.weight"):
            assert weight.dtype == torch.bfloat16
            assert torch.equal(weight, exact.get_parameter(name).to(torch.bfloat16)), name


def _config(tmp_path, tiny_model_dir, sentiment_csv, *extra):
    return load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.max_length=32",
                              f"data.train_file={sentiment_csv}", "data.max_train_samples=64",
                              "data.max_eval_samples=16", f"training.output_dir={tmp_path / 'run'}",
                              "training.max_steps=3", "training.batch_size=16", "training.progress=false", *extra])


def test_a_bf16_run_holds_the_base_in_bf16_trains_fp32_and_says_so(tmp_path, tiny_model_dir, sentiment_csv):
    config = _config(tmp_path, tiny_model_dir, sentiment_csv, "training.precision=bf16", "method.method=lora")
    run = setup(config)
    model = run.accelerator.unwrap_model(run.model)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    result = train(config)
    assert result.precision == "bf16"
    folder = tmp_path / "run"
    assert yaml.safe_load((folder / "run.yaml").read_text())["resolved"]["precision"] == "bf16"
    assert {t.dtype for t in load_file(folder / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}
    optimizer_state = load_file(next((folder / "checkpoints").iterdir()) / "optimizer.safetensors")
    assert {t.dtype for t in optimizer_state.values() if t.dim()} == {torch.float32}  # AdamW's moments


def test_auto_records_what_it_chose(tmp_path, tiny_model_dir, sentiment_csv):
    result = train(_config(tmp_path, tiny_model_dir, sentiment_csv))
    assert result.precision == precision.resolve("auto")

"""Per-row adapters (deltatune.mixed_batch, adapter_names=): each row of one batch equals that
row run alone with its adapter, for every method of the case table that mixes; the others refuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from cases import case_params
from tiny import assert_close_ulps, build, inputs, output, perturb

NAMES = ["a", "b", "__base__", "a", "c"]  # row -> adapter; "c" is a LoRA beside the case's method


def loaded(case, family):
    """A tiny model with two adapters of the case's method (different weights) and a LoRA."""
    model = build(family)
    for seed, name in enumerate(["a", "b"]):
        dt.apply(model, case.config(family), adapter_name=name)
        perturb(model, seed=seed + 3)
    dt.apply(model, dt.LoraConfig(r=2, lora_alpha=4), adapter_name="c")
    perturb(model, seed=9)
    return model


def alone(model, batch: dict, row: int, name: str) -> torch.Tensor:
    """Row ``row`` of the batch, run by itself with adapter ``name`` (the base for "__base__")."""
    one = {k: v[row:row + 1] for k, v in batch.items()}
    if name == "__base__":
        with dt.disable_adapters(model):
            return output(model, one)[0]
    dt.set_adapter(model, name)
    return output(model, one)[0]


@pytest.mark.parametrize("case,family", case_params(lambda c: c.per_row))
def test_each_row_equals_its_adapter_alone(case, family):
    model = loaded(case, family)
    batch = inputs(family, batch=len(NAMES))
    with dt.mixed_batch(model, NAMES):
        mixed = output(model, batch)
    keyword = model(**batch, adapter_names=NAMES).logits.detach()
    for row, name in enumerate(NAMES):
        expected = alone(model, batch, row, name)
        assert_close_ulps(mixed[row], expected)
        assert_close_ulps(keyword[row], expected)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-4)  # the two adapters differ, as their rows must


@pytest.mark.parametrize("case,family", case_params(lambda c: not c.per_row))
def test_methods_that_cannot_mix_refuse_and_run_alone(case, family):
    model = build(family)
    dt.apply(model, case.config(family), adapter_name="a")
    perturb(model)
    batch = inputs(family, batch=2)
    expected = output(model, batch)
    try:  # a second adapter of the kind, or (full fine-tuning takes no other) the base
        dt.apply(model, case.config(family), adapter_name="other")
    except dt.ConfigError:  # the model is left as it was
        pass
    others = dt.core.state.require_state(model).configs.keys() - {"a"}
    with pytest.raises(dt.DeltatuneError, match="'a' .*cannot share a batch|no base model left") as info:
        with dt.mixed_batch(model, ["a", next(iter(others), "__base__")]):
            pass
    if "cannot share a batch" in str(info.value):
        assert str(info.value).endswith("\n  fix: give its rows a batch of their own (deltatune serve does).")
    with dt.mixed_batch(model, ["a", "a"]):  # one adapter for every row: that adapter alone
        assert_close_ulps(output(model, batch), expected)
    assert dt.active_adapters(model) == (["other"] if others else ["a"])  # restored on leaving


GENERATING = {"lora": lambda: dt.LoraConfig(r=4, target_modules="all-linear"),
              "prefix": lambda: dt.PrefixTuningConfig(num_virtual_tokens=3, reparameterize=False),
              "ia3": lambda: dt.IA3Config(),  # output scaling, and feed-forward input scaling (rows apart)
              "adapter": lambda: dt.AdapterConfig(bottleneck=4),
              "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=3, init="random")}


@pytest.mark.parametrize("method", GENERATING)
@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_generate_runs_each_row_with_its_adapter(family, method):
    model = build(family)
    for seed, name in enumerate(["a", "b"]):
        dt.apply(model, GENERATING[method](), adapter_name=name)
        perturb(model, scale=0.5, seed=seed)
    ids = inputs(family, batch=3)["input_ids"]
    names = ["a", "b", "__base__"]
    settings = {"max_new_tokens": 5, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    mixed = model.generate(ids, adapter_names=names, **settings)  # inputs by position, as transformers allows
    for row, name in enumerate(names):
        if name == "__base__":
            with dt.disable_adapters(model):
                expected = model.generate(input_ids=ids[row:row + 1], **settings)
        else:
            dt.set_adapter(model, name)
            expected = model.generate(input_ids=ids[row:row + 1], **settings)
        # a row that ends (EOS) before the others is padded in the batch, with pad_token_id 0
        done = expected.shape[1]
        assert mixed[row, :done].tolist() == expected[0].tolist() and not mixed[row, done:].any()
    assert len({tuple(r.tolist()) for r in mixed}) == 3  # three adapters, three different continuations


def prompt_mix(family):
    """Prompts of 2 and 5 vectors, a LoRA and a prefix on one model, and rows naming them and the base."""
    model = build(family)
    configs = {"short": dt.PromptTuningConfig(num_virtual_tokens=2, init="random"),
               "long": dt.PromptTuningConfig(num_virtual_tokens=5, init="random"),
               "lora": dt.LoraConfig(r=2, lora_alpha=4)}
    if family != "distilbert":  # DistilBERT takes no prefixes (tests/methods/test_prefix.py)
        configs["prefix"] = dt.PrefixTuningConfig(num_virtual_tokens=3, reparameterize=False)
    for seed, (name, config) in enumerate(configs.items()):
        dt.apply(model, config, adapter_name=name)
        perturb(model, scale=0.5, seed=seed)
    return model, ["long", *configs, "__base__", "short"]


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2", "llama", "t5"])
def test_prompts_of_different_lengths_and_prefixes_share_a_batch(family):
    """The shorter prompt's rows and the rows without a prompt are padded (in front on decoders,
    behind on encoders), and each row still equals itself alone."""
    model, names = prompt_mix(family)
    batch = inputs(family, batch=len(names))
    mixed = model(**batch, adapter_names=names).logits.detach()
    assert mixed.shape[1] == (3 if family in ("bert", "roberta", "distilbert") else batch.get(
        "decoder_input_ids", batch["input_ids"]).shape[1])  # the prompts' positions cut out
    for row, name in enumerate(names):
        assert_close_ulps(mixed[row], alone(model, batch, row, name))


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_generate_with_prompts_of_different_lengths(family):
    model, names = prompt_mix(family)
    ids = inputs(family, batch=len(names))["input_ids"]
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    mixed = model.generate(input_ids=ids, adapter_names=names, **settings)
    for row, name in enumerate(names):
        with dt.mixed_batch(model, [name]):  # one name: that adapter alone, or the base
            expected = model.generate(input_ids=ids[row:row + 1], **settings)
        done = expected.shape[1]
        assert mixed[row, :done].tolist() == expected[0].tolist() and not mixed[row, done:].any()


def test_bad_names_are_refused_with_the_adapters_listed():
    model = build("bert")
    dt.apply(model, dt.LoraConfig(r=2), adapter_name="a")
    dt.apply(model, dt.LoraConfig(r=2), adapter_name="b")
    dt.set_adapter(model, "a")
    batch = inputs("bert", batch=2)
    with pytest.raises(dt.ConfigError) as info:
        model(**batch, adapter_names=["a", "typo"])
    assert str(info.value) == ("adapter_names names 'typo', which this model does not have.\n"
                               "  fix: its adapters: a, b; '__base__' runs a row on the base model.")
    with pytest.raises(dt.ConfigError) as info:
        with dt.mixed_batch(model, []):
            pass
    assert str(info.value) == ("adapter_names = []: it needs one adapter name per row.\n"
                               "  fix: pass a list of names, '__base__' for rows that run the base model alone.")
    with pytest.raises(dt.ConfigError) as info:
        model(**batch, adapter_names=["a", "__base__", "a"])
    assert str(info.value) == ("adapter_names names 3 rows, and a module received 2.\n"
                               "  fix: pass one adapter name per row of the batch.")
    assert output(model, batch).shape == (2, 3)  # nothing left behind by the failed calls
    dt.merge(model)
    with pytest.raises(dt.MergeError) as info:
        model(**batch, adapter_names=["a", "__base__"])
    assert str(info.value) == ("cannot run per-row adapters while adapters are merged into the base weights.\n"
                               "  fix: call deltatune.unmerge(model) first.")
    full = dt.apply(build("bert"), dt.FullFineTuningConfig(), adapter_name="a")
    with pytest.raises(dt.MergeError) as info:
        with dt.mixed_batch(full, ["a", "__base__"]):
            pass
    assert str(info.value) == ("adapter 'a' changed the base weights in place: there is no base model left for the "
                               "'__base__' rows.\n  fix: load a fresh base model for them.")


@pytest.mark.parametrize("config", [
    dt.IA3Config(target_modules=["0", "1"], feedforward_modules=["1"]),  # the generic per-row path
    dt.LoraConfig(r=2, target_modules=["0", "1"]),  # LoRA's fused path: no count read back to the host
], ids=["ia3", "lora"])
def test_row_indices_live_on_the_batchs_device(config):
    """The meta device stands in for a GPU: row indices built on the CPU would not index it, and
    a size the device would have to send back to the host cannot be read from it."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 5))
    for name in ("a", "b"):
        dt.apply(model, config, name)
    model.to("meta")
    with dt.mixed_batch(model, ["a", "b", "__base__"]):
        out = model(torch.zeros(3, 6, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 5)


def test_heads_of_different_sizes_cannot_share_a_batch():
    model = build("bert")
    dt.apply(model, dt.LoraConfig(r=2, modules_to_save=["classifier"]), adapter_name="a")
    dt.apply(model, dt.LoraConfig(r=2, modules_to_save=["classifier"]), adapter_name="b")
    head = model.classifier.deltas["b"].copy
    model.classifier.deltas["b"].copy = torch.nn.Linear(head.in_features, 5)
    with pytest.raises(dt.ConfigError) as info:
        model(**inputs("bert", batch=2), adapter_names=["a", "b"])
    assert str(info.value) == ("adapter 'b' gives outputs shaped (5,) where the other rows' are (3,) (a task head of "
                               "another size).\n  fix: put adapters with different heads in separate batches.")


def test_rows_of_slices_only_tensors_with_a_row_per_batch_entry():
    from deltatune.core.layer import rows_of

    x, scalar, other = torch.arange(6.0).view(3, 2), torch.tensor(5.0), torch.tensor([1.0, 2.0])
    sliced = rows_of((x, scalar, other, 7), torch.tensor([0, 2]), batch=3)
    assert sliced[0].tolist() == [[0.0, 1.0], [4.0, 5.0]] and sliced[1:] == (scalar, other, 7)


def test_keyword_arguments_reach_the_rows_that_run_apart():
    """A copied module (modules_to_save) runs its rows apart from the base's: with the same
    keyword arguments the caller gave."""

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2))

        def forward(self, x, factor=1.0):
            return x * self.weight * factor

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.scale = torch.nn.Linear(2, 2), Scale()

    model = dt.apply(Net(), dt.LoraConfig(r=1, target_modules=["proj"], modules_to_save=["scale"]), adapter_name="a")
    with torch.no_grad():
        model.scale.deltas["a"].copy.weight.fill_(3.0)
    x = torch.ones(2, 2)
    with dt.mixed_batch(model, ["a", "__base__"]):
        assert model.scale(x, factor=2.0).tolist() == [[6.0, 6.0], [2.0, 2.0]]

"""dt.combine_adapters against peft's add_weighted_adapter: for each of its 11 ways, the combined
adapter's update of every layer and the model's outputs equal peft's on the same adapters (tiny
BERT, GPT-2 with Conv1D, LLaMA); DARE's random masks are drawn as peft draws them, from the seed."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.combine import COMBINATIONS
from deltatune.core.method import deltas_of
from deltatune.core.verbs import require_state
from tiny import assert_close_ulps, build, inputs, output, perturb

peft = pytest.importorskip("peft")

TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
OPTIONS = {"density": 0.5, "svd_clamp": None}


def two_adapters(family: str, ranks=(2, 2), targets_b=None, **b_options):
    """A tiny model with LoRA adapters 'a' and 'b' trained to random values (b on other targets, if given)."""
    model = build(family)
    dt.apply(model, dt.LoraConfig(r=ranks[0], target_modules=TARGETS[family]), adapter_name="a")
    perturb(model, seed=3)
    dt.apply(model, dt.LoraConfig(r=ranks[1], target_modules=targets_b or TARGETS[family], **b_options), adapter_name="b")
    perturb(model, seed=4)
    return model


def peft_twin(model, family: str, tmp_path):
    """The same base in peft with the same two adapters, loaded from deltatune's peft-format files."""
    for name in ("a", "b"):
        dt.save_adapter(model, tmp_path / name, adapter_name=name, format="peft")
    theirs = peft.PeftModel.from_pretrained(build(family), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    return theirs.eval()


def peft_updates(theirs, name: str) -> dict[str, torch.Tensor]:
    """Each adapted layer's update in peft, oriented (d_out, d_in), by deltatune's module name."""
    from peft.tuners.lora import LoraLayer

    updates = {}
    for key, module in theirs.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            update = module.get_delta_weight(name)
            updates[key] = update.T if module.fan_in_fan_out else update
    return updates


def draw_peft_masks_from(seed: int, monkeypatch) -> None:
    """peft draws DARE's masks from torch's global generator, after its new adapter's initialisation
    has drawn from it too; here its random_pruning draws the same masks from a generator of its own,
    seeded as combine_adapters seeds its own: the masks are then equal, mask for mask."""
    from peft.utils import merge_utils

    generator = torch.Generator().manual_seed(seed)

    def random_pruning(tensor, density, rescale):
        pruned = tensor * torch.bernoulli(torch.full_like(tensor, density), generator=generator)
        return pruned / density if rescale else pruned

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family", TARGETS)
@pytest.mark.parametrize("how", COMBINATIONS)
def test_every_way_to_combine_equals_peft(family, how, tmp_path, monkeypatch):
    weights = {"a": 0.7, "b": -0.4}  # a negative weight subtracts
    model = two_adapters(family)
    theirs = peft_twin(model, family, tmp_path)
    draw_peft_masks_from(11, monkeypatch)
    theirs.add_weighted_adapter(list(weights), list(weights.values()), "ab", combination_type=how, **OPTIONS)
    dt.combine_adapters(model, weights, how=how, name="ab", seed=11, **OPTIONS)
    assert dt.active_adapters(model) == ["b"]  # added, not made active (as peft)
    ours = {m: d.delta_weight() for m, _, d in deltas_of(model, "ab")}
    expected = peft_updates(theirs, "ab")
    assert ours.keys() == expected.keys()
    for module in ours:
        assert_close_ulps(ours[module].detach(), expected[module].detach(), msg=module)
    dt.set_adapter(model, "ab")
    theirs.set_adapter("ab")
    batch = inputs(family)
    assert_close_ulps(output(model, batch), output(theirs, batch))


@pytest.mark.filterwarnings("ignore")
def test_cat_and_svd_combine_other_ranks_and_targets_exactly_or_truncated(tmp_path):
    weights = {"a": 1.0, "b": 1.0}
    model = two_adapters("llama", ranks=(2, 3), targets_b=["v_proj", "k_proj"])
    theirs = peft_twin(model, "llama", tmp_path)
    for how in ("cat", "svd"):
        theirs.add_weighted_adapter(list(weights), list(weights.values()), how, combination_type=how, svd_rank=2)
        dt.combine_adapters(model, weights, how=how, name=how, svd_rank=2)
        ours, expected = ({m: d.delta_weight() for m, _, d in deltas_of(model, how)}, peft_updates(theirs, how))
        assert ours.keys() == expected.keys() == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"}
        for module in ours:
            assert_close_ulps(ours[module].detach(), expected[module].detach(), msg=module)
    cat = {m: d for m, _, d in deltas_of(model, "cat")}
    alone = {name: {m: d.delta_weight() for m, _, d in deltas_of(model, name)} for name in weights}
    for module, delta in cat.items():  # cat is exact: the sum of the updates, rank 2 + 3
        assert delta.lora_A.weight.shape[0] == 5
        total = sum(alone[n][module] for n in weights if module in alone[n])
        assert_close_ulps(delta.delta_weight().detach(), total.detach())
    with pytest.raises(dt.ConfigError, match=r"(?s)combines the factors A and B themselves.*a: r=2, b: r=3.*how='cat'"):
        dt.combine_adapters(model, weights, how="linear", name="linear")
    assert "linear" not in require_state(model).methods


def test_combination_options_and_sources_are_checked_before_anything_changes():
    model = two_adapters("bert")
    before = set(require_state(model).methods)
    for kwargs, message in [
            ({"how": "average"}, "how = 'average' is not a way to combine adapters"),
            ({"how": "ties"}, r"density = None must be above 0 and at most 1"),
            ({"how": "dare_linear", "density": 1.5}, r"density = 1.5 must be above 0"),
            ({"how": "svd", "svd_rank": 0}, "svd_rank = 0 must be at least 1"),
            ({"how": "svd", "svd_clamp": 2.0}, "svd_clamp = 2.0 is a quantile"),
            ({"how": "ties", "density": 0.5, "majority_sign_method": "vote"}, "majority_sign_method = 'vote'"),
            ({"name": "a"}, "an adapter named 'a' is already on the model")]:
        with pytest.raises(dt.ConfigError, match=message):
            dt.combine_adapters(model, {"a": 0.5, "b": 0.5}, **kwargs)
    with pytest.raises(dt.ConfigError, match="no adapter named 'c' is on the model"):
        dt.combine_adapters(model, {"a": 0.5, "c": 0.5})
    with pytest.raises(dt.ConfigError, match=r"the weight of 'b' is nan"):
        dt.combine_adapters(model, {"a": 0.5, "b": float("nan")})
    dt.apply(model, dt.IA3Config(), adapter_name="c")
    dt.apply(model, dt.IA3Config(), adapter_name="c2")
    with pytest.raises(dt.ConfigError, match=r"adapters of different methods \(ia3, lora\)"):
        dt.combine_adapters(model, {"a": 0.5, "c": 0.5})
    with pytest.raises(dt.ConfigError, match=r"(?s)'c' \(ia3\) cannot be combined with how = 'svd'.*linear only"):
        dt.combine_adapters(model, {"c": 0.5, "c2": 0.5}, how="svd")
    dt.apply(model, dt.LoraConfig(r=2, use_dora=True), adapter_name="d")
    with pytest.raises(dt.ConfigError, match=r"(?s)'d' \(lora\).*DoRA's trained magnitudes"):
        dt.combine_adapters(model, {"a": 0.5, "d": 0.5})
    dt.apply(model, dt.AdapterConfig(bottleneck=4), adapter_name="e")
    with pytest.raises(dt.ConfigError, match=r"(?s)deltatune does not combine this method's adapters.*the methods that "
                                             r"combine: ia3, lora"):
        dt.combine_adapters(model, {"e": 1.0})
    assert set(require_state(model).methods) == before | {"c", "c2", "d", "e"}


@pytest.mark.filterwarnings("ignore")
def test_ia3_vectors_combine_as_their_weighted_sum_equal_to_peft(tmp_path):
    model = build("bert")
    for name, seed in (("a", 3), ("b", 4)):
        dt.apply(model, dt.IA3Config(target_modules=["key", "value", "output.dense"],
                                     feedforward_modules=["output.dense"]), adapter_name=name)
        perturb(model, seed=seed)
    theirs = peft_twin(model, "bert", tmp_path)
    theirs.add_weighted_adapter(["a", "b"], [0.6, 0.4], "ab")
    dt.combine_adapters(model, {"a": 0.6, "b": 0.4}, how="linear", name="ab")
    vectors = {m: d.ia3_l for m, _, d in deltas_of(model, "ab")}
    alone = [{m: d.ia3_l for m, _, d in deltas_of(model, n)} for n in "ab"]
    assert all(torch.equal(vectors[m], 0.6 * alone[0][m] + 0.4 * alone[1][m]) for m in vectors)
    dt.set_adapter(model, "ab")
    theirs.set_adapter("ab")
    batch = inputs("bert")
    assert_close_ulps(output(model, batch), output(theirs, batch))


def test_a_combination_keeps_one_named_head_or_refuses_heads_that_differ(tmp_path):
    model = build("bert")
    for name, seed in (("a", 3), ("b", 4)):
        dt.apply(model, dt.LoraConfig(r=2, modules_to_save=["classifier"]), adapter_name=name)
        perturb(model, seed=seed)
    with pytest.raises(dt.ConfigError, match=r"(?s)'a' and 'b' train their own classifier.*head='a'"):
        dt.combine_adapters(model, {"a": 0.5, "b": 0.5}, how="cat")
    dt.combine_adapters(model, {"a": 0.5, "b": 0.5}, how="cat", head="b", name="ab")
    kept = {k: v for k, v in dt.adapter_state_dict(model, "ab").items() if k.startswith("classifier.")}
    theirs = {k: v for k, v in dt.adapter_state_dict(model, "b").items() if k.startswith("classifier.")}
    assert kept.keys() == theirs.keys() and kept and all(torch.equal(kept[k], theirs[k]) for k in kept)
    # a combined adapter is an adapter like any other: saved, loaded, merged, converted to peft
    dt.set_adapter(model, "ab")
    batch = inputs("bert")
    expected = output(model, batch)
    dt.save_adapter(model, tmp_path / "ab", adapter_name="ab")
    again = dt.load_adapter(build("bert"), tmp_path / "ab")
    assert_close_ulps(output(again, batch), expected)
    dt.merge(again)
    assert_close_ulps(output(again, batch), expected)
    dt.save_adapter(model, tmp_path / "peft", adapter_name="ab", format="peft")
    theirs_model = peft.PeftModel.from_pretrained(build("bert"), tmp_path / "peft").eval()
    assert_close_ulps(output(theirs_model, batch), expected)


def test_the_cli_combines_run_folders_into_a_run_that_evaluates_and_predicts_like_any(tmp_path, tiny_model_dir, sentiment_csv):
    from deltatune.cli import COMBINATIONS as LISTED
    from deltatune.cli import main
    from deltatune.core.combine import COMBINATIONS as ALL
    from deltatune.train.config import load_config
    from deltatune.train.inference import evaluate_run, predict_texts
    from deltatune.train.loop import train

    assert LISTED == ALL
    runs = []
    for seed in (1, 2):
        folder = tmp_path / f"run{seed}"
        train(load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_file={sentiment_csv}", "data.max_train_samples=32", "data.max_eval_samples=8",
                                 "training.max_steps=2", "training.batch_size=8", "training.warmup_steps=0",
                                 f"training.seed={seed}", f"training.output_dir={folder}", "training.progress=false",
                                 "method.r=2"]))
        runs.append(str(folder))
    assert main(["combine", *runs, "--weights", "0.5", "0.5", "--how", "cat", "--output", str(tmp_path / "soup")]) != 0
    assert main(["combine", *runs, "--weights", "0.5", "0.5", "--how", "cat", "--head", "1",
                 "--output", str(tmp_path / "soup")]) == 0
    described = dt.read_adapter(tmp_path / "soup" / "adapter")[0]
    assert described["config"]["r"] == 4 and described["config"]["modules_to_save"] == ["bert.pooler", "classifier"]
    assert set(evaluate_run(tmp_path / "soup")) >= {"test_accuracy", "test_loss"}
    assert predict_texts(tmp_path / "soup", ["a great film"])[0]["label"] in predict_texts(runs[1], ["x"])[0]["probabilities"]
    assert main(["combine", runs[0], "--weights", "0.5", "0.5", "--output", str(tmp_path / "x")]) != 0

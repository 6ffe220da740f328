"""AdaLoRA: the update by hand, the budget schedule by hand, step for step equal to peft's own
allocator, files that hold the kept triplets only (both ways with peft), resume, and refusals."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

import deltatune as dt
from deltatune.core.state import require_state
from deltatune.io.adapter_files import restore_adapter
from deltatune.methods.adalora import svd_deltas
from deltatune.train.config import load_config
from deltatune.train.loop import train
from tiny import HIDDEN, LAYERS, assert_close_ulps, build, inputs, interrupt_at_step, output, perturb

SCHEDULE = dict(init_r=6, target_r=2, total_step=10, tinit=2, tfinal=3, deltaT=2, target_modules=["query", "value"])


def deltas(model):
    return svd_deltas(model, "default")


def hooks_of(model, total_steps):
    hooks = require_state(model).methods["default"].training_hooks(model, "default")
    hooks.start(total_steps)
    return hooks


def test_the_update_is_scaled_b_diag_e_a_and_a_fresh_adapter_changes_nothing():
    model, batch = build("bert"), inputs("bert")
    base_out = output(model, batch)
    dt.apply(model, dt.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6))
    torch.testing.assert_close(output(model, batch), base_out, rtol=0, atol=0)  # E starts at zero
    perturb(model, scale=0.5)
    query = model.bert.encoder.layer[0].attention.self.query
    d, x = query.deltas["default"], torch.randn(4, HIDDEN)
    change = d.lora_B.detach() @ torch.diag(d.lora_E.detach().view(-1)) @ d.lora_A.detach() * 6 / (3 + 1e-5)
    W0, b = query.base_layer.weight.detach(), query.base_layer.bias.detach()
    torch.testing.assert_close(query(x), x @ (W0 + change).T + b)
    # the update alone in float64, where peft's 1e-5 in the scale (3e-6 of it) is far above rounding
    d64 = copy.deepcopy(d).double()
    change64 = d64.lora_B.detach() @ torch.diag(d64.lora_E.detach().view(-1)) @ d64.lora_A.detach() * 6 / (3 + 1e-5)
    update = d64.post((x.double(),), torch.zeros(4, HIDDEN, dtype=torch.float64))
    torch.testing.assert_close(update, x.double() @ change64.T, rtol=1e-12, atol=1e-15)
    expected = output(model, batch)
    dt.merge(model)
    assert_close_ulps(output(model, batch), expected)
    dt.unmerge(model)
    assert_close_ulps(query.base_layer.weight.detach(), W0)


def test_the_budget_follows_the_cubic_schedule_by_hand():
    model = dt.apply(build("bert"), dt.AdaLoraConfig(**SCHEDULE))
    hooks = hooks_of(model, 10)
    initial, target = 6 * 4, 2 * 4  # four layers: query and value of two blocks
    final = 10 - 3
    expected = {1: (initial, False), 2: (initial, False)}  # t <= tinit
    for t in range(3, final + 1):  # (1 - (t - tinit) / (T - tfinal - tinit))³, cut every deltaT steps
        left = 1 - (t - 2) / (final - 2)
        expected[t] = (int((initial - target) * left ** 3 + target), t % 2 == 0)
    expected.update({8: (target, True), 9: (target, True), 10: (target, True)})
    assert {t: hooks.budget(t, 10) for t in range(1, 11)} == expected
    assert [expected[t][0] for t in (3, 4, 5, 6, 7)] == [16, 11, 9, 8, 8]


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def test_ten_steps_cut_the_same_triplets_with_the_same_losses_as_peft():
    """peft's model and allocator against ours, from the same start, on the same batches."""
    theirs = peft.get_peft_model(tiny_bert(), peft.AdaLoraConfig(**SCHEDULE, task_type="SEQ_CLS"))
    ours = dt.apply(tiny_bert(), dt.AdaLoraConfig(**SCHEDULE))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if ".lora_" in name:
                module, factor = name.removeprefix("base_model.model.").split(".lora_")
                getattr(ours.get_submodule(module).deltas["default"], "lora_" + factor.split(".")[0]).copy_(param)
    trained = [[p for n, p in m.named_parameters() if ".lora_" in n and "ranknum" not in n] for m in (theirs, ours)]
    for model, params in zip((theirs, ours), trained):
        model.requires_grad_(False).train()
        for p in params:
            p.requires_grad_(True)
    their_opt, our_opt = (torch.optim.SGD(params, lr=0.5) for params in trained)
    hooks = hooks_of(ours, 10)
    g = torch.Generator().manual_seed(3)
    for step in range(1, 11):
        batch = {"input_ids": torch.randint(0, 100, (4, 8), generator=g), "labels": torch.tensor([0, 1, 0, 1])}
        their_loss = theirs(**batch).loss  # peft adds the orthogonality term to the model's loss
        their_loss.backward()
        their_opt.step()
        theirs.base_model.update_and_allocate(step)
        their_opt.zero_grad()
        our_loss = ours(**batch).loss + hooks.extra_loss()
        our_loss.backward()
        our_opt.step()
        hooks.after_step(step, 10)
        our_opt.zero_grad()
        assert our_loss.item() == pytest.approx(their_loss.item(), rel=1e-6)
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern:
            assert {n: d.kept.tolist() for n, d in deltas(ours).items()} == {
                k.removesuffix(".lora_E.default"): v for k, v in pattern.items()}
    for name, delta in deltas(ours).items():  # the last steps keep the final cut: revived E zeroed again
        module = theirs.get_submodule("base_model.model." + name)
        assert not delta.lora_E[~delta.kept].any()
        for factor in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(delta, factor), getattr(module, factor)["default"], rtol=1e-5, atol=1e-7)
    kept = [d.rank() for d in deltas(ours).values()]
    assert sum(kept) == 2 * 4 and len(set(kept)) > 1  # the target budget, spread unevenly


def sgd_steps(model, extra_loss, after_step, steps: int = 10):
    """``steps`` SGD steps on random batches: the loss plus ``extra_loss()``, then ``after_step(step)``
    with the gradients still there (where AdaLoRA's allocator runs)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    g = torch.Generator().manual_seed(3)
    model.train()
    for step in range(1, steps + 1):
        batch = {"input_ids": torch.randint(0, 100, (4, 8), generator=g), "labels": torch.tensor([0, 1, 0, 1])}
        (model(**batch).loss + extra_loss()).backward()
        opt.step()
        after_step(step)
        opt.zero_grad()
    return model.eval()


def trained_with_cuts(model, steps: int = 10):
    """``model`` after ``steps`` SGD steps with AdaLoRA's hooks: some triplets cut."""
    hooks = hooks_of(model, steps)
    return sgd_steps(model, hooks.extra_loss, lambda step: hooks.after_step(step, steps), steps)


def test_the_file_holds_the_kept_triplets_and_the_pattern_and_loads_with_equal_outputs(tmp_path):
    model = trained_with_cuts(dt.apply(tiny_bert(), dt.AdaLoraConfig(**SCHEDULE, modules_to_save=["classifier"])))
    batch = {"input_ids": torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(5))}
    expected = output(model, batch)
    ranks = {n: d.rank() for n, d in deltas(model).items()}
    report = dt.parameter_report(model)
    per_triplet = 2 * 32 + 1  # a row of A, a column of B, a value of E
    assert report.trainable == 4 * 6 * per_triplet + 32 * 2 + 2  # every triplet trains, the head too
    assert report.stored == 8 * per_triplet + 32 * 2 + 2  # the file: the 8 kept
    assert report.not_stored == 16 * per_triplet  # the 16 cut
    assert report.method_figures == {"ranks_kept": 8, "ranks_initial": 24, "ranks_target": 8, "rank_per_module": ranks}
    assert "ranks kept: 8" in str(report)

    dt.save_adapter(model, tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A")} == {f"{n}.lora_A": r for n, r in ranks.items()}
    assert sum(t.numel() for t in tensors.values()) == report.stored
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["config"]["rank_pattern"]
    assert {n: sum(kept) for n, kept in saved.items()} == ranks

    again = dt.load_adapter(tiny_bert(), tmp_path / "ours").eval()
    assert_close_ulps(output(again, batch), expected)
    assert {n: d.rank() for n, d in deltas(again).items()} == ranks


@pytest.mark.filterwarnings("ignore")
def test_a_peft_adapter_with_cut_ranks_loads_here_and_ours_loads_in_peft(tmp_path):
    theirs = peft.get_peft_model(tiny_bert(), peft.AdaLoraConfig(**SCHEDULE, task_type="SEQ_CLS"))
    trained_by_peft(theirs)
    batch = {"input_ids": torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(5))}
    expected = output(theirs.eval(), batch)
    theirs.save_pretrained(tmp_path / "peft")

    ours = dt.load_adapter(tiny_bert(), tmp_path / "peft").eval()
    assert (output(ours, batch) - expected).abs().max() <= 1e-5
    assert sum(d.rank() for d in deltas(ours).values()) == 8
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert dt.parameter_report(ours).stored == sum(t.numel() for t in peft_file.values())

    dt.save_adapter(ours, tmp_path / "to-peft", format="peft")
    again = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "to-peft").eval()
    assert (output(again, batch) - expected).abs().max() <= 1e-5


def trained_by_peft(model, steps: int = 10):
    """peft adds its regulariser to the model's loss itself."""
    return sgd_steps(model, lambda: 0, model.base_model.update_and_allocate, steps)


def test_the_best_state_comes_back_though_later_steps_cut_other_triplets(tmp_path):
    model = dt.apply(tiny_bert(), dt.AdaLoraConfig(**SCHEDULE))
    hooks = hooks_of(model, 10)
    batch = {"input_ids": torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(5))}
    perturb(model, scale=0.3)
    dt.save_adapter(model, tmp_path / "best")  # every triplet kept
    expected = output(model, batch)
    hooks.importance = {f"{n}.{f}": torch.rand_like(getattr(d, f)) for n, d in deltas(model).items()
                        for f in ("lora_A", "lora_B", "lora_E")}
    hooks.uncertainty = dict(hooks.importance)
    hooks._keep_best(8)
    assert (output(model, batch) - expected).abs().max() > 1e-4  # 16 of 24 triplets cut
    restore_adapter(model, tmp_path / "best")
    assert_close_ulps(output(model, batch), expected)
    assert all(bool(d.kept.all()) for d in deltas(model).values())


def config(folder, csv, *extra):
    return load_config(None, [
        "model.name_or_path=minilm-l6", "model.max_length=32", f"data.train_file={csv}",
        "data.max_train_samples=96", "data.max_eval_samples=16", f"training.output_dir={folder}",
        "training.batch_size=8", "training.learning_rate=5e-3", "training.max_steps=8", "training.save_steps=2",
        "training.logging_steps=1", "training.progress=false", "method=adalora", "method.init_r=4",
        "method.target_r=2", "method.tinit=1", "method.tfinal=2", "method.target_modules=[query, value]", *extra])


def test_a_run_cuts_to_the_target_and_a_resumed_run_ends_as_a_straight_one(tmp_path, sentiment_csv, monkeypatch):
    straight = train(config(tmp_path / "straight", sentiment_csv))
    assert straight.parameters.method_figures["ranks_kept"] == 2 * 12  # MiniLM: 6 blocks x query, value
    restore = interrupt_at_step(monkeypatch, 6)
    resumed_config = config(tmp_path / "resumed", sentiment_csv)
    assert train(resumed_config).interrupted
    restore()
    train(resumed_config, resume=True)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape  # the same triplets kept (a layer may keep none)
        if a[key].numel():
            assert_close_ulps(b[key], a[key])


def test_a_schedule_longer_than_the_run_is_refused_before_training(tmp_path, sentiment_csv):
    with pytest.raises(dt.ConfigError, match="leave no step of the 8 to cut ranks in"):
        train(config(tmp_path / "run", sentiment_csv, "method.tinit=6"))


def test_bad_configs_are_refused_with_the_fix():
    with pytest.raises(dt.ConfigError, match="choose target_r <= init_r"):
        dt.AdaLoraConfig(init_r=4, target_r=8)
    with pytest.raises(dt.ConfigError, match="leave no step"):
        dt.AdaLoraConfig(total_step=10, tinit=5, tfinal=5)
    with pytest.raises(dt.ConfigError, match="one True/False per triplet"):
        dt.AdaLoraConfig(init_r=2, target_r=1, rank_pattern={"query": [True]})
    with pytest.raises(dt.ConfigError, match="does not target"):
        dt.apply(build("bert"), dt.AdaLoraConfig(init_r=2, target_r=1, rank_pattern={"nowhere": [True, False]}))


def test_an_adapter_whose_ranks_were_cut_is_not_trained_again():
    model = dt.apply(build("bert"), dt.AdaLoraConfig(init_r=2, target_r=1, target_modules=["query"], rank_pattern={
        f"bert.encoder.layer.{i}.attention.self.query": [True, False] for i in range(LAYERS)}))
    with pytest.raises(dt.ConfigError, match="ranks were already cut"):
        require_state(model).methods["default"].training_hooks(model, "default")

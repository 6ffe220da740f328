"""Prefix tuning: config checks, counts by hand, attention worked out by hand, the folded file,
masks, generation, several prefixes at once, and the families it refuses."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import deltatune as dt
from tiny import HIDDEN, LAYERS, VOCAB, assert_close_ulps, build, inputs, output, perturb

N, H = 3, 16  # prefix length, MLP width
KV = {"bert": HIDDEN, "roberta": HIDDEN, "gpt2": HIDDEN, "llama": 2 * 8, "t5": 4 * 8}  # d_kv
STACKS = {"t5": 2}  # T5 has self-attention in its encoder and its decoder


def plain(**kwargs) -> dt.PrefixTuningConfig:
    return dt.PrefixTuningConfig(num_virtual_tokens=N, reparameterize=False, **kwargs)


def prefixes_of(model, adapter: str = "default") -> torch.Tensor:
    """The adapter's plain prefixes, (layers, 2, n, d_kv), layers in model order."""
    return model.deltatune_virtual_tokens.deltas[adapter].prefixes


# --- config and refusals -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"num_virtual_tokens": 0}, "prefix.num_virtual_tokens"), ({"hidden": 0}, "prefix.hidden"),
    ({"reparameterize": "yes"}, "prefix.reparameterize"),
])
def test_invalid_config_names_the_field_and_the_fix(kwargs, field):
    with pytest.raises(dt.ConfigError) as info:
        dt.PrefixTuningConfig(**kwargs)
    assert str(info.value).startswith(f"{field} ") and "\n  fix: " in str(info.value)


def test_distilbert_is_refused_before_anything_changes():
    model = build("distilbert")
    keys = sorted(model.state_dict())
    with pytest.raises(dt.ConfigError, match="DistilBertSelfAttention.*takes no key/value cache"):
        dt.apply(model, dt.PrefixTuningConfig())
    assert sorted(model.state_dict()) == keys and not hasattr(model, "_deltatune_state")
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_other_attention_kernels_are_refused():
    model = build("llama")
    model.set_attn_implementation("flex_attention")
    with pytest.raises(dt.ConfigError, match="eager and sdpa"):
        dt.apply(model, dt.PrefixTuningConfig())


# --- counts ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(KV))
def test_counts_by_hand(family):
    layers = LAYERS * STACKS.get(family, 1)
    stored = layers * 2 * N * KV[family]  # bert: 2 x 2 x 3 x 32 = 384
    model = dt.apply(build(family), plain())
    report = dt.parameter_report(model)
    assert report.trainable == report.stored == stored and report.not_stored == 0
    model = dt.apply(build(family), dt.PrefixTuningConfig(num_virtual_tokens=N, hidden=H))
    mlp = N * HIDDEN + HIDDEN * H + H + (H + 1) * layers * 2 * KV[family]  # bert: 2800
    report = dt.parameter_report(model)
    assert (report.trainable, report.stored, report.not_stored) == (mlp, stored, mlp)
    assert report.changed == 0


# --- the formula -------------------------------------------------------------------------

def test_bert_attention_equals_attention_over_extra_key_rows():
    """Prefixes equal to the keys and values of n extra rows give the rows' attention."""
    model = dt.apply(build("bert"), plain())
    attention = model.bert.encoder.layer[0].attention.self
    rows, x = torch.randn(1, N, HIDDEN), torch.randn(1, 5, HIDDEN)
    with torch.no_grad():
        prefixes_of(model)[0].copy_(torch.stack([attention.key(rows)[0], attention.value(rows)[0]]))
        with_prefix = attention(x)[0]
        with dt.disable_adapters(model):
            with_rows = attention(torch.cat([rows, x], dim=1))[0][:, N:]
    assert_close_ulps(with_prefix, with_rows)


def test_llama_attention_by_hand():
    """Rotated queries and keys, grouped heads, causal mask; the prefixes are seen by every query."""
    model = dt.apply(build("llama"), plain())
    perturb(model, scale=1.0)
    attn, T = model.model.layers[0].self_attn, 5
    x = torch.randn(1, T, HIDDEN)
    cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
    prefix = prefixes_of(model)[0].detach()
    with torch.no_grad():
        got = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
        q, k, v = (p(x).view(1, T, -1, 8).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = torch.cat([prefix[0].view(N, 2, 8).transpose(0, 1)[None], k], dim=2)
        v = torch.cat([prefix[1].view(N, 2, 8).transpose(0, 1)[None], v], dim=2)
        scores = q @ repeat_kv(k, 2).transpose(2, 3) / 8 ** 0.5
        visible = torch.ones(T, N + T, dtype=torch.bool).tril(N)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        expected = attn.o_proj((weights @ repeat_kv(v, 2)).transpose(1, 2).reshape(1, T, -1))
    assert_close_ulps(got, expected)


def test_t5_prefixes_get_no_relative_position_bias():
    model = dt.apply(build("t5"), plain())
    perturb(model, scale=1.0)
    attn, T = model.encoder.block[0].layer[0].SelfAttention, 5
    x = torch.randn(1, T, HIDDEN)
    prefix = prefixes_of(model)[0].detach()  # the encoder's first layer comes first
    with torch.no_grad():
        got, bias, _ = attn(x)
        q, k, v = (p(x).view(1, T, 4, 8).transpose(1, 2) for p in (attn.q, attn.k, attn.v))
        k = torch.cat([prefix[0].view(N, 4, 8).transpose(0, 1)[None], k], dim=2)
        v = torch.cat([prefix[1].view(N, 4, 8).transpose(0, 1)[None], v], dim=2)
        expected_bias = torch.cat([torch.zeros(1, 4, T, N), attn.compute_bias(T, T)], dim=-1)
        weights = (q @ k.transpose(2, 3) + expected_bias).softmax(-1)  # T5 does not scale
        expected = attn.o((weights @ v).transpose(1, 2).reshape(1, T, -1))
    torch.testing.assert_close(bias, expected_bias)
    assert_close_ulps(got, expected)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_eager_and_sdpa_agree(family):
    model = dt.apply(build(family), plain())
    perturb(model, scale=1.0)
    sdpa = output(model, inputs(family))
    model.set_attn_implementation("eager")
    assert_close_ulps(output(model, inputs(family)), sdpa)


@pytest.mark.parametrize("family,pad_left", [("bert", False), ("roberta", False), ("t5", False),
                                             ("llama", True), ("gpt2", True)])
def test_the_mask_still_hides_padding(family, pad_left):
    model = dt.apply(build(family), plain())
    perturb(model, scale=1.0)
    batch = inputs(family)
    if pad_left:
        batch["attention_mask"] = batch["attention_mask"].flip(1)
    padded = (batch["attention_mask"][-1] == 0).nonzero()[0, 0]
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][-1, padded] = (batch["input_ids"][-1, padded] + 1) % VOCAB
    real = batch["attention_mask"][-1].bool() if pad_left else slice(None)
    assert_close_ulps(output(model, changed)[-1][real], output(model, batch)[-1][real])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logits_keep_the_input_length(family):
    model = dt.apply(build(family), dt.PrefixTuningConfig(num_virtual_tokens=N, hidden=H))
    batch = inputs(family)
    assert output(model, batch).shape == (*batch["input_ids"].shape, VOCAB)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_two_active_prefixes_act_as_one_concatenated_prefix(family):
    model = build(family)
    for name in ["a", "b"]:
        dt.apply(model, plain(), name)
    dt.set_adapter(model, ["a", "b"])
    single = dt.apply(build(family), dt.PrefixTuningConfig(num_virtual_tokens=2 * N, reparameterize=False))
    with torch.no_grad():
        prefixes_of(single).copy_(torch.cat([prefixes_of(model, "a"), prefixes_of(model, "b")], dim=2))
    assert_close_ulps(output(model, inputs(family)), output(single, inputs(family)))


def test_prefix_and_lora_share_the_key_projection():
    model = dt.apply(build("bert"), dt.LoraConfig(r=2, target_modules=["key"]), "lora")
    dt.apply(model, plain(), "prefix")
    dt.set_adapter(model, ["lora", "prefix"])
    perturb(model)
    both = output(model, inputs("bert"))
    dt.delete_adapter(model, "prefix")
    lora_only = dt.apply(build("bert"), dt.LoraConfig(r=2, target_modules=["key"]), "lora")
    hooks = lambda m: [(len(x._forward_pre_hooks), len(x._forward_hooks)) for x in m.modules()]  # noqa: E731
    assert hooks(model) == hooks(lora_only)  # the prefix's hooks went with it
    assert not torch.allclose(output(model, inputs("bert")), both)


# --- the folded file ---------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "llama"])
def test_the_file_holds_folded_prefixes_and_loads_without_the_mlp(family, tmp_path):
    model = dt.apply(build(family), dt.PrefixTuningConfig(num_virtual_tokens=N, hidden=H))
    perturb(model, scale=1.0)
    expected = output(model, inputs(family))
    _, tensors = dt.read_adapter(dt.save_adapter(model, tmp_path / "adapter"))
    assert {k: tuple(t.shape) for k, t in tensors.items()} == {
        "deltatune_virtual_tokens.prefixes": (LAYERS, 2, N, KV[family])}
    loaded = dt.load_adapter(build(family), tmp_path / "adapter")
    assert_close_ulps(output(loaded, inputs(family)), expected)
    names = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert names == ["deltatune_virtual_tokens.deltas.default.prefixes"]
    report = dt.parameter_report(loaded)
    assert report.trainable == report.stored and report.not_stored == 0


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_the_mlp_runs_once_per_forward_and_never_reuses_an_old_output(family):
    model = dt.apply(build(family), dt.PrefixTuningConfig(num_virtual_tokens=N, hidden=H))
    encoder = model.deltatune_virtual_tokens.deltas["default"].encoder
    calls = []
    encoder.down.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    for _ in range(2):  # a second step must not backpropagate through the first one's graph
        model(**inputs(family)).logits.pow(2).mean().backward()
    assert len(calls) == 2 and encoder.out is None


def test_the_mlp_trains_and_the_file_follows_it():
    model = dt.apply(build("llama"), dt.PrefixTuningConfig(num_virtual_tokens=N, hidden=H))
    model.train()
    before = dt.adapter_state_dict(model)
    model(**inputs("llama")).logits.pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    after = dt.adapter_state_dict(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)


# --- generation --------------------------------------------------------------------------

def greedy_scores(model, batch: dict, steps: int) -> torch.Tensor:
    ids, scores = batch["input_ids"], []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        scores.append(logits[:, -1])
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return torch.stack(scores, dim=1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_prefixes_on_a_causal_lm(family):
    model = dt.apply(build(family), dt.PrefixTuningConfig(num_virtual_tokens=N, hidden=H))
    perturb(model, scale=1.0)
    batch = {"input_ids": inputs(family)["input_ids"]}
    result = model.generate(**batch, max_new_tokens=4, do_sample=False, output_scores=True,
                            return_dict_in_generate=True, pad_token_id=0)
    assert_close_ulps(torch.stack(result.scores, 1), greedy_scores(model, batch, 4))
    with torch.no_grad():
        cache = model(**batch, use_cache=True).past_key_values
    assert cache.get_seq_length() == batch["input_ids"].shape[1]  # the cache never holds prefixes

"""``model.dropout``: every dropout probability of the pre-trained model set to one value, under
whatever name its architecture gives it, while the method's own dropout stays."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune import ConfigError
from deltatune.hf.dropout import set_base_dropout
from deltatune.tasks import task_for
from deltatune.train.config import RunConfig
from deltatune.train.setup import build_model, resolve_model_path
from tiny import HIDDEN, LAYERS, VOCAB, assert_close_ulps, build, inputs, output


def llama_with_attention_dropout():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.3,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


MODELS = {"bert": lambda: build("bert"), "distilbert": lambda: build("distilbert"), "gpt2": lambda: build("gpt2"),
          "t5": lambda: build("t5"), "llama": llama_with_attention_dropout}
#: the config keys each architecture names its dropout by (what set_base_dropout must find)
KEYS = {"bert": {"hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"},
        "distilbert": {"dropout", "attention_dropout", "seq_classif_dropout"},
        "gpt2": {"resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"},
        "t5": {"dropout_rate", "classifier_dropout"}, "llama": {"attention_dropout"}}


@pytest.mark.parametrize("family", MODELS)
def test_no_dropout_makes_training_mode_compute_what_eval_mode_does(family):
    model, batch = MODELS[family](), inputs("llama" if family == "llama" else family)
    expected = output(model, batch)  # eval mode
    model.train()
    torch.manual_seed(3)
    assert not torch.allclose(output(model, batch), expected), "the model's dropout is on to begin with"
    keys = set_base_dropout(model, 0.0)
    assert KEYS[family] <= set(keys)
    assert all(getattr(model.config, key) == 0.0 for key in keys)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    # train and eval take the same kernels here: equal to rounding of the same operations
    assert_close_ulps(output(model, batch), expected, ulps=4)


def test_the_methods_own_dropout_is_kept():
    model = build("bert")
    set_base_dropout(model, 0.0)
    model = dt.apply(model, dt.LoraConfig(r=4, lora_dropout=0.4, target_modules=["query", "value"]))
    kept = [m.p for name, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p]
    assert kept and set(kept) == {0.4}  # one per wrapped layer, nothing of the base's


def test_model_dropout_in_a_run_config_reaches_the_bundled_model():
    config = RunConfig.from_dict({"model": {"dropout": 0.0}, "method": {"method": "lora", "lora_dropout": 0.1}})
    model = build_model(config, task_for(config), resolve_model_path(config.model.name_or_path))
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.0
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.0, 0.1}


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_a_dropout_outside_its_range_is_refused(value):
    with pytest.raises(ConfigError, match=r"model.dropout"):
        RunConfig.from_dict({"model": {"dropout": value}})

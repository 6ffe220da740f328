"""The worker on every task: two adapters' requests in one forward pass (a generation included)
read exactly as each adapter's own ``predict`` reads them alone."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import deltatune as dt
from deltatune.serve.registry import Instance, Served
from deltatune.serve.worker import Job, Stats, run_batch
from deltatune.tasks import task_for
from deltatune.train.config import load_config
from tiny import perturb

CONTEXT = "Paris is the capital of France and it has many museums and parks that people visit every year."


def bert(cls, vocab: int, **kwargs):
    return cls(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=128, **kwargs))


def llama(vocab: int):
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0))


def t5(vocab: int, tokenizer):
    return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, decoder_start_token_id=tokenizer.cls_token_id,
                                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id))


# task -> (its model, run settings, LoRA targets, each adapter's inputs)
CASES = {
    "tokens": (lambda v, t: bert(BertForTokenClassification, v, num_labels=3),
               ["data.labels=[O,B-PER,I-PER]", "model.max_length=8"], ["query", "value"],
               (["Mary Jones flew to New York", ["a", "b"]], ["yesterday it rained on the whole long coast"])),
    "qa": (lambda v, t: bert(BertForQuestionAnswering, v), ["model.max_length=24", "task.stride=4"], ["query", "value"],
           ([{"question": "capital of France?", "context": CONTEXT}], [{"question": "what?", "context": "short"},
                                                                        {"question": "parks?", "context": CONTEXT}])),
    "causal_lm": (lambda v, t: llama(v), ["task.max_new_tokens=4", "model.max_length=12"], ["q_proj", "v_proj"],
                  (["capital of peru ?", "a"], ["a much longer prompt than the others here"])),
    "seq2seq": (t5, ["task.max_new_tokens=4"], ["q", "v"], (["capital of peru", "ok"], ["a longer source text"])),
}


@pytest.mark.parametrize("task_type", CASES)
def test_two_adapters_share_one_pass_and_read_as_each_alone(task_type):
    make_model, settings, targets, inputs = CASES[task_type]
    tokenizer = AutoTokenizer.from_pretrained(dt.assets.model_path())
    torch.manual_seed(0)
    model = make_model(tokenizer.vocab_size, tokenizer).eval()
    for name in ("one", "two"):
        dt.apply(model, dt.LoraConfig(r=4, target_modules=targets), adapter_name=name)
        perturb(model, scale=0.5, seed=len(name) + ord(name[0]))
    config = load_config(None, [f"task.type={task_type}", "method=lora", *settings])
    task = task_for(config)
    alone = []
    for name, texts in zip(("one", "two"), inputs):
        dt.set_adapter(model, name)
        alone.append(task.predict(model, tokenizer, texts))
    assert alone[0] != task.predict(model, tokenizer, inputs[0])  # the adapters differ

    instance = Instance((task_type,), model, tokenizer, AutoTokenizer.from_pretrained(dt.assets.model_path()))
    served = {name: Served(name, Path(name), config, task, instance) for name in ("one", "two")}
    jobs = [Job(served[name], task.encode(tokenizer, texts), None, 0.0) for name, texts in zip(served, inputs)]
    stats = Stats()
    outcomes = run_batch(jobs, SimpleNamespace(lock=threading.Lock(), adapters=served), stats)
    assert outcomes == alone
    assert stats.forward_passes == 1 and stats.multi_adapter_passes == 1

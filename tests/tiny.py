"""Tiny random-init models of every supported family, built from transformers configs."""

from __future__ import annotations

import os

import torch
import transformers
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

transformers.logging.set_verbosity_error()

VOCAB = 101
HIDDEN = 32
LAYERS = 2


def bert(num_labels: int = 3):
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels))


def roberta(num_labels: int = 3):
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=70, num_labels=num_labels, pad_token_id=1))


def distilbert(num_labels: int = 3):
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=4, hidden_dim=64,
        max_position_embeddings=64, num_labels=num_labels))


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4,
                                      n_positions=64, bos_token_id=0, eos_token_id=0))


def llama():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def t5():
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


FAMILIES = {"bert": bert, "roberta": roberta, "distilbert": distilbert, "gpt2": gpt2,
            "llama": llama, "t5": t5}
HEADS = {"bert": ["classifier"], "roberta": ["classifier"], "distilbert": ["pre_classifier", "classifier"],
         "gpt2": [], "llama": [], "t5": []}


def build(family: str, seed: int = 0):
    """A tiny model in eval mode (dropout off) with fixed weights."""
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def inputs(family: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict:
    """Model inputs with a padded row, so attention masks matter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0
    batch_inputs = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        batch_inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, 4), generator=g)
    return batch_inputs


def output(model, batch: dict) -> torch.Tensor:
    """Logits without autograd: attention kernels differ with and without grad in the last bits."""
    with torch.no_grad():
        return model(**batch).logits


#: How far two orders of the same arithmetic may drift, in units in the last place (ulps) of the
#: largest value compared. Every op of a tiny model rounds, and kernels round differently on other
#: CPUs (AVX-512, AVX2, MKL's generic path), so the bound scales with the values: T5's and LLaMA's
#: unscaled activations are 100x BERT's logits. Worst seen across the suite on AVX-512 and on
#: `make test-kernels`: 55 ulps (gpt2, rows batched vs alone), so 256 leaves a 4x margin.
REORDERED = 256
#: A weight merged and unmerged (W + d - d, DoRA's norm rescale included): worst seen 21 ulps.
ROUND_TRIP = 64


def assert_close_ulps(actual, expected, ulps: int = REORDERED, msg=None) -> None:
    """``actual`` equals ``expected`` to within ``ulps`` ulps of ``max|expected|`` (of its dtype)."""
    expected = torch.as_tensor(expected)
    actual = torch.as_tensor(actual, dtype=expected.dtype)
    atol = ulps * torch.finfo(expected.dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=msg)


def perturb(model, scale: float = 0.1, seed: int = 2) -> None:
    """Give every trainable parameter non-zero random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=g))


def logged_lines(run_folder) -> list[dict]:
    """Every line a run logged to its ``metrics.jsonl`` (training steps and evaluations), in order."""
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(run_folder) / "metrics.jsonl").read_text().splitlines()]


def logged_losses(run_folder) -> list[float]:
    """The training losses a run logged to its ``metrics.jsonl``, in order."""
    return [line["loss"] for line in logged_lines(run_folder) if "loss" in line]


def evaluated_metric_names(run_folder) -> set[str]:
    """The validation metrics a run logged (``eval_`` taken off): what its task's evaluate returned."""
    return {key[5:] for line in logged_lines(run_folder) for key in line if key.startswith("eval_")}


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` (parameters and buffers), copied: what ``assert_same`` compares."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, before: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor of ``model`` is bit for bit what it was (keys and values, not just keys)."""
    after = model.state_dict()
    assert after.keys() == before.keys(), what
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"{what}: {changed[:3]}"


def file_hashes(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` (and "folder" for each folder) by relative path:
    equal before and after a command means nothing was created, changed or deleted there."""
    import hashlib
    from pathlib import Path

    folder = Path(folder)
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "folder"
            for f in sorted(folder.rglob("*"))}


#: country -> capital: a tiny generation task a model learns in a few dozen steps.
CAPITALS = {"france": "paris", "spain": "madrid", "italy": "rome", "japan": "tokyo", "egypt": "cairo",
            "peru": "lima", "kenya": "nairobi", "norway": "oslo", "greece": "athens", "cuba": "havana"}


def save_tiny(folder, make_model):
    """Save ``make_model(tokenizer)`` (random init, seed 0) with the bundled model's real
    tokenizer into ``folder``, ready for ``from_pretrained`` offline; returns ``folder``."""
    from transformers import AutoTokenizer

    from deltatune import assets

    tokenizer = AutoTokenizer.from_pretrained(assets.model_path())
    torch.manual_seed(0)
    make_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Net(nn.Module):
    """One linear layer named ``proj``: the smallest model a method can adapt."""

    def __init__(self, d_in: int = 6, d_out: int = 5):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def shown_at(warning, test_file: str) -> bool:
    """A warning points at the test's own line, not inside deltatune. Under `make mutation`
    mutmut's trampolines stand between deltatune's frames and the walk stops at the first one."""
    return warning.filename == test_file or ("MUTANT_UNDER_TEST" in os.environ and "mutmut" in warning.filename)


def interrupt_at_step(monkeypatch, step_number: int):
    """Training raises KeyboardInterrupt (as Ctrl-C would) in optimizer step ``step_number``;
    returns a function that puts the real step back."""
    import deltatune.train.loop as loop

    real = loop._optimizer_step

    def step(run, number):
        if number == step_number:
            raise KeyboardInterrupt
        real(run, number)

    monkeypatch.setattr(loop, "_optimizer_step", step)
    return lambda: monkeypatch.setattr(loop, "_optimizer_step", real)


def assert_fresh_is_base_and_trained_merges(config, weight_of, scale: float) -> None:
    """On tiny LLaMA: a fresh adapter gives the base outputs exactly; perturbed by ``scale`` it changes
    them, merged it gives the same outputs and unmerged the weight ``weight_of(model)`` comes back."""
    import deltatune as dt

    model, batch = build("llama"), inputs("llama")
    base_out = output(model, batch)
    dt.apply(model, config)
    torch.testing.assert_close(output(model, batch), base_out, rtol=0, atol=0)
    perturb(model, scale=scale)
    expected = output(model, batch)
    assert (expected - base_out).abs().max() > 1e-2
    W0 = weight_of(model).detach().clone()
    dt.merge(model)
    assert_close_ulps(output(model, batch), expected)
    dt.unmerge(model)
    assert_close_ulps(weight_of(model).detach(), W0)


def assert_conv1d_trains_here_but_not_in_peft(config, refusal: str, tmp_path, scale: float) -> None:
    """On tiny GPT-2 (Conv1D layers, which the method's peft twin has no layer for): merged outputs
    equal, the deltatune file round-trips exactly, and writing peft's format is refused."""
    import pytest

    import deltatune as dt

    model, batch = dt.apply(build("gpt2"), config), inputs("gpt2")
    perturb(model, scale=scale)
    expected = output(model, batch)
    dt.merge(model)
    assert_close_ulps(output(model, batch), expected)
    dt.unmerge(model)
    dt.save_adapter(model, tmp_path / "ours")
    again = dt.load_adapter(build("gpt2"), tmp_path / "ours")
    torch.testing.assert_close(output(again, batch), expected, rtol=0, atol=0)
    with pytest.raises(dt.AdapterFileError, match=refusal):
        dt.save_adapter(model, tmp_path / "peft", format="peft")

"""Causal language modelling on (prompt, completion) pairs: the loss counts completions only.

Each row becomes ``prompt tokens + completion tokens + end-of-text``; the prompt's labels are
-100, so the model learns to answer, not to write prompts:

    tokens   <prompt ........> <completion ....> </s>
    labels   -100 -100 ... -100 <completion ....> </s>

Where the tokenizer has a chat template (and ``task.chat_template`` is on) the prompt is
rendered as one user turn followed by the assistant's opening. ``task.packing`` joins training
examples into ``model.max_length`` blocks (attention then crosses example boundaries, as in the
usual naive packing). The metric is perplexity, exp of the mean loss per completion token;
predictions are greedy generations of up to ``task.max_new_tokens`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from torch import nn
from transformers import AutoModelForCausalLM

from ..core.fields import help_field
from ..data.loading import require_columns
from .base import Encoded, RunSections, TaskBase, TaskConfig
from .batching import label_nll, mean_nll, pad_id, stack


@dataclass
class CausalLmTaskConfig(TaskConfig):
    prompt_column: str = help_field("prompt", "Column with the instruction or prompt (no loss on it).")
    completion_column: str = help_field("completion", "Column with the completion the model learns.")
    chat_template: bool = help_field(True, "Render the prompt with the tokenizer's chat template, where it has one.")
    packing: bool = help_field(False, "Join training examples into blocks of model.max_length tokens.")
    max_new_tokens: int = help_field(64, "Tokens generated per prompt by predict.", range="[1, inf)")


def fit(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a pair to ``max_length`` tokens: the completion keeps at least half of them (all, if
    shorter), the prompt gives up its beginning first.

    Returns:
        (prompt, completion), together at most ``max_length`` tokens.
    """
    completion = completion[:min(len(completion), max(max_length - len(prompt), max_length // 2))]
    keep = max_length - len(completion)
    return prompt[len(prompt) - keep:] if keep < len(prompt) else prompt, completion


def pack(split: Dataset, block: int) -> Dataset:
    """Training examples joined end to end and cut into ``block``-token rows (the last may be shorter)."""
    def join(batch: dict[str, list]) -> dict[str, list]:
        ids = [t for row in batch["input_ids"] for t in row]
        labels = [t for row in batch["labels"] for t in row]
        starts = range(0, len(ids), block)
        return {"input_ids": [ids[i:i + block] for i in starts], "labels": [labels[i:i + block] for i in starts],
                "attention_mask": [[1] * len(ids[i:i + block]) for i in starts],
                "length": [len(ids[i:i + block]) for i in starts]}

    return split.map(join, batched=True, batch_size=1000, remove_columns=split.column_names)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and the number of scored tokens, per example (labels -100 skipped)."""
    return label_nll(logits[:, :-1], labels[:, 1:])


class CausalLanguageModeling(TaskBase):
    name = "causal_lm"
    primary_metric = "perplexity"
    metric_names = ("perplexity", "loss")
    config_class = CausalLmTaskConfig
    model_keys = ("input_ids", "attention_mask", "labels")

    def prepare(self, splits: DatasetDict, tokenizer: Any, config: RunSections) -> DatasetDict:
        o = self.options
        require_columns(splits, {"task.prompt_column": o.prompt_column,
                                 "task.completion_column": o.completion_column})
        end = [] if _eos(tokenizer) is None else [_eos(tokenizer)]

        def encode(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"input_ids": [], "labels": []}
            for prompt, completion in zip(batch[o.prompt_column], batch[o.completion_column]):
                answer = tokenizer(completion or "", add_special_tokens=False)["input_ids"] + end
                prompt_ids, answer = fit(self.prompt_ids(tokenizer, prompt or ""), answer, config.model.max_length)
                out["input_ids"].append(prompt_ids + answer)
                out["labels"].append([-100] * len(prompt_ids) + answer)
            out["attention_mask"] = [[1] * len(ids) for ids in out["input_ids"]]
            out["length"] = [len(ids) for ids in out["input_ids"]]
            return out

        data = {name: split.map(encode, batched=True, remove_columns=split.column_names)
                for name, split in splits.items()}
        if o.packing and "train" in data:
            data["train"] = pack(data["train"], config.model.max_length)
        return DatasetDict(data)

    def prompt_ids(self, tokenizer: Any, prompt: str) -> list[int]:
        """The prompt's token ids: a user turn of the chat template, or the plain tokenised text."""
        if self.options.chat_template and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(prompt)["input_ids"]

    def load_model(self, path: str) -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, **self.pretrained_kwargs())

    def head_modules(self, model: nn.Module) -> list[str]:
        return []  # the LM head is pre-trained, not new: methods adapt it only where targeted

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """Mean loss per completion token over the whole split, and its exponential, perplexity."""
        total, count = 0.0, 0
        for batch in loader:
            nll, tokens = token_nll(model(**batch).logits, batch["labels"])
            nll, tokens = accelerator.gather_for_metrics((nll, tokens))
            total, count = total + nll.sum().item(), count + int(tokens.sum().item())
        loss = mean_nll(total, count)
        return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss}

    def encode(self, tokenizer: Any, inputs: list[Any]) -> Encoded:
        """An input is a prompt, or a row with the prompt column."""
        prompts = [x[self.options.prompt_column] if isinstance(x, dict) else x for x in inputs]
        return Encoded(prompts, [{"input_ids": self.prompt_ids(tokenizer, p)[-self.config.model.max_length:]}
                                 for p in prompts])

    def forward(self, model: nn.Module, tokenizer: Any, features: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Each row's greedy continuation (new token ids; a row that stopped early is padded)."""
        encoded, pad = [row["input_ids"] for row in features], pad_id(tokenizer)
        ids = stack(encoded, pad, side="left")  # generation continues at the right end
        mask = stack([[1] * len(e) for e in encoded], 0, side="left")
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.options.max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=_eos(tokenizer))
        return list(out[:, ids.shape[1]:])

    def decode(self, tokenizer: Any, encoded: Encoded, outputs: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Greedy completions."""
        return [{"prompt": p, "completion": tokenizer.decode(new, skip_special_tokens=True).strip()}
                for p, new in zip(encoded.items, outputs)]


def _eos(tokenizer: Any) -> int | None:
    """The end-of-text id; [SEP] for WordPiece tokenizers that have no end-of-text token."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

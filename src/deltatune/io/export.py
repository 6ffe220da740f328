"""Merged export: an adapter folded into its base, written as a plain transformers model.

The export carries what the run knew: its label names (``config.json``'s ``id2label``), the
base model's tokenizer, and a ``README.md`` model card with the method, the base model, the
data and the metrics. A run keeps its adapter in ``RUN/adapter`` beside ``run.yaml`` and
``report.json``; an adapter folder without a run gives a card that says what is unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from ..core.errors import AdapterFileError, TargetError
from ..core.verbs import adapter_state, merge_and_unload, unload
from ..core.yaml12 import dumps
from ..version import __version__
from .adapter_files import load_read_adapter, read_adapter
from .atomic import atomic_write_text, follow_umask
from .run_folder import RUN_CONFIG, RunRecord, locate, read_record, run_yaml

#: what ``--dtype`` may ask for an export
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HEADS = ("classifier.weight", "classifier.out_proj.weight", "score.weight", "qa_outputs.weight")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
#: peft's task types -> the transformers auto class with that task's head.
PEFT_TASK_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification",
                     "TOKEN_CLS": "AutoModelForTokenClassification",
                     "QUESTION_ANS": "AutoModelForQuestionAnswering", "CAUSAL_LM": "AutoModelForCausalLM",
                     "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel"}
#: the end of a model class's name -> the Hub's pipeline tag (first match wins).
PIPELINE_TAGS = {"ForSequenceClassification": "text-classification", "ForTokenClassification": "token-classification",
                 "ForQuestionAnswering": "question-answering", "ForCausalLM": "text-generation",
                 "LMHeadModel": "text-generation", "ForConditionalGeneration": "text2text-generation",
                 "EncoderDecoderModel": "text2text-generation", "Model": "feature-extraction"}


def base_class(description: dict[str, Any]) -> str | None:
    """The transformers class an adapter was saved from, by name.

    deltatune records it; peft records it as ``auto_mapping`` when its config has no task type
    (deltatune's ``convert --to peft`` writes it too), and otherwise its task type names the head.
    """
    peft = description.get("peft_config") or {}
    return (description.get("base_model_class") or (peft.get("auto_mapping") or {}).get("base_model_class")
            or PEFT_TASK_CLASSES.get(peft.get("task_type")))


def base_for(adapter: Path, description: dict[str, Any], tensors: dict[str, Any], base: str | None = None,
             run: RunRecord | None = None) -> nn.Module:
    """The base model an adapter (read from ``adapter``) was saved from, loaded from a local folder
    (never the hub) in full precision (a base the adapter trained on quantised too: the merged
    export is a plain model), with the run's label names and config overrides when there is a run."""
    path = base or description.get("base_model_name_or_path")
    if not path or not Path(path).is_dir():
        raise AdapterFileError(f"the base model of '{adapter}' is not a local folder ({path!r}).",
                               "pass --base with the folder of the base model.")
    class_name = base_class(description) or "AutoModel"
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise AdapterFileError(f"transformers has no model class '{class_name}'.", "pass --base and upgrade transformers.")
    head = next((tensors[k] for k in HEADS if k in tensors), None)
    kwargs = dict((run.config.get("model") or {}).get("config_overrides") or {}) if run else {}
    if head is not None and "Classification" in class_name:
        kwargs["num_labels"] = head.shape[0]
        kwargs.update(_label_maps(run.labels if run else [], head.shape[0], run))
    stored = transformers.AutoConfig.from_pretrained(path).dtype
    model = model_class.from_pretrained(path, dtype=torch.float32, **kwargs)
    model.config.dtype = stored  # what the export writes unless told otherwise (the merge computes in float32)
    return model


def _label_maps(labels: list[str], outputs: int, run: RunRecord | None) -> dict[str, dict]:
    if not labels:
        return {}
    if len(labels) != outputs:
        raise AdapterFileError(f"{run.folder / RUN_CONFIG} names {len(labels)} labels, but the adapter's "
                               f"head has {outputs} outputs.", "export the adapter this run wrote.")
    return {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}


def export_merged(adapter: str | Path, output: str | Path, base: str | None = None, dtype: str | None = None) -> Path:
    """Merge the adapter into its base and save model, config, tokenizer and a model card to ``output``.

    Args:
        adapter: an adapter folder (deltatune or peft format), or a run folder (its ``adapter``).
        output: the folder to write; ``from_pretrained`` and ``pipeline`` load it without deltatune.
        base: the base model's folder, if not the one the adapter records.
        dtype: ``float32`` or ``bfloat16`` for the written weights; default: the dtype of the base
            checkpoint. The merge computes in float32 either way and rounds once.

    Raises:
        MergeError: the method cannot merge (adapters, prompts, prefixes); nothing is written.
        AdapterFileError: the base model cannot be found locally, or the run's labels do not
            fit the adapter's head.
    """
    located = locate(adapter)
    adapter, run = located.adapter, read_record(located.run) if located.run else None
    description, tensors = read_adapter(adapter)  # once: base, head size and weights all come from it
    model = base_for(adapter, description, tensors, base, run)
    try:
        load_read_adapter(model, description, tensors, adapter)
    except AdapterFileError as error:
        if base_class(description) or not isinstance(error.__cause__, TargetError):
            raise
        raise AdapterFileError(f"the adapter in '{adapter}' does not record its model class, and it does not fit "
                               f"{type(model).__name__}: {error.__cause__.message}",
                               "convert it again from the deltatune adapter with this version of deltatune, "
                               "or add the task_type peft uses for it to adapter_config.json.") from error
    method = adapter_state(model).methods["default"]
    plain = unload(model) if method.in_place else merge_and_unload(model)
    plain = plain.to(EXPORT_DTYPES[dtype] if dtype else _checkpoint_dtype(plain))
    output = Path(output)
    plain.save_pretrained(output)
    tokenizer = _save_tokenizer(base or description.get("base_model_name_or_path"), output)
    atomic_write_text(output / "README.md", model_card(description, plain, run, base, tokenizer))
    follow_umask(*output.iterdir())  # save_pretrained's safetensors files are 0o600
    return output


def _checkpoint_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the base checkpoint stores its weights in (its config's ``dtype``), float32 if unsaid."""
    recorded = getattr(model.config, "dtype", None)
    return recorded if isinstance(recorded, torch.dtype) else getattr(torch, str(recorded or "float32"), torch.float32)


def _save_tokenizer(path: str | None, output: Path) -> bool:
    # transformers 5 builds an empty tokenizer (special tokens only) for a folder without one
    if not path or not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return False
    try:
        transformers.AutoTokenizer.from_pretrained(path).save_pretrained(output)
    except (OSError, ValueError, TypeError):
        return False  # a base without a tokenizer: the model is still complete
    return True


def model_card(description: dict[str, Any], model: nn.Module, run: RunRecord | None, base: str | None,
               tokenizer: bool) -> str:
    """A Hugging Face model card: YAML front matter, then how the model was made and how it scored."""
    config = description["config"]
    loaded_from = base or description.get("base_model_name_or_path")
    base_name = str(base or (run and (run.config.get("model") or {}).get("name_or_path")) or loaded_from or "unknown")
    class_name = type(model).__name__
    tag = next((t for suffix, t in PIPELINE_TAGS.items() if class_name.endswith(suffix)), None)
    front = {"library_name": "transformers", "base_model": base_name, "tags": ["deltatune", config["method"]],
             **({"pipeline_tag": tag} if tag else {})}
    # every transformers config has an id2label; only a classification head gives it a meaning
    id2label = dict(model.config.id2label) if "Classification" in class_name else {}
    settings = ", ".join(f"{k}={v!r}" for k, v in config.items() if k != "method")
    lines = ["---", dumps(front).rstrip(), "---", "",
             f"# {config['method']} merged into {Path(base_name).name}", "",
             f"A `{class_name}`: the base model's weights with a **{config['method']}** adapter merged in. "
             "Plain transformers loads it, without deltatune or peft.", "",
             "## How it was made", "",
             f"- Base model: `{base_name}`" + (f" (weights from `{loaded_from}`)" if loaded_from != base_name else ""),
             f"- Method: {config['method']} ({settings})",
             f"- Merged and saved by `deltatune export` (deltatune {__version__}) from a "
             f"{description['format']}-format adapter",
             "- Tokenizer: " + ("the base model's, saved beside the weights" if tokenizer
                                else "not included (the base model folder has none)")]
    lines += _run_lines(run, id2label) if run else _unknown_lines(id2label)
    if tag:
        lines += ["", "## Use", "", "```python", "from transformers import pipeline", "",
                  f'pipe = pipeline("{tag}", model="PATH/TO/THIS/FOLDER")', "```"]
    if run:
        lines += ["", "## The run's configuration", "", f"From `{run.folder / RUN_CONFIG}`:", "", "```yaml",
                  dumps(run_yaml(run.config, run.resolved) if run.resolved else run.config).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _run_lines(run: RunRecord, id2label: dict) -> list[str]:
    data, training = run.config.get("data") or {}, run.config.get("training") or {}
    task = (run.config.get("task") or {}).get("type", "unknown")
    parameters = run.report.get("parameters") or {}
    lines = [f"- Task: {task}, trained on `{data.get('train_file') or data.get('source') or 'unknown'}`",
             f"- Training: {run.report.get('steps', '?')} steps, learning rate {training.get('learning_rate')}, "
             f"batch size {training.get('batch_size')}, seed {training.get('seed')}; the adapter of step "
             f"{run.report.get('best_step', '?')}, the best on validation"]
    if id2label:
        lines.append("- Labels: " + ", ".join(f"{i} = {name}" for i, name in id2label.items()))
    if parameters:  # a report's parameters always hold all three (ParameterReport.to_dict)
        lines.append(f"- Trainable parameters: {parameters['trainable']:,} of {parameters['total']:,} "
                     f"({parameters['trainable_percent']:.2f}%)")
    metrics = {k: v for k, v in (run.report.get("metrics") or {}).items() if isinstance(v, (int, float))}
    lines += ["", "## Metrics", ""]
    if not metrics:
        return lines + ["None: the run stopped before its final evaluation."]
    return lines + ["Measured by the run: `eval_*` on its validation split at the best step, `test_*` on its "
                    "test split.", "", "| metric | value |", "|---|---|",
                    *(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))]


def _unknown_lines(id2label: dict) -> list[str]:
    lines = ["", "## Not known", "",
             "This model was exported from a bare adapter folder, without the run that trained it (no "
             f"`{RUN_CONFIG}` beside it), so this card cannot say:", ""]
    if id2label:
        lines.append(f"- the label names: `config.json` holds transformers' placeholders "
                     f"({', '.join(id2label.values())}); set `id2label` and `label2id` there if you know them;")
    return lines + ["- the training data and hyperparameters;", "- any metrics."]

"""Merged export from a real (tiny) run: label names, tokenizer and model card travel with the
model; peft-format adapters export to the same model as deltatune's own."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import peft
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel, pipeline

import deltatune as dt
from deltatune.cli import main
from deltatune.io.convert import inspect_adapter
from deltatune.io.export import export_merged
from deltatune.train.config import load_config
from deltatune.train.inference import predict_texts
from deltatune.train.loop import train
from tiny import assert_close_ulps, build

TEXTS = ["a great film", "an awful story"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, sentiment_csv):
    """A LoRA run of two steps on the tiny BERT: labels 'negative' and 'positive'."""
    folder = tmp_path_factory.mktemp("run")
    train(load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.max_length=32",
                             f"data.train_file={sentiment_csv}", "data.max_train_samples=32",
                             "data.max_eval_samples=16", f"training.output_dir={folder}", "training.max_steps=2",
                             "training.batch_size=16", "training.progress=false", "method.method=lora"]))
    return folder


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_an_export_of_a_run_names_its_labels_and_carries_tokenizer_and_card(run, tmp_path, tiny_model_dir):
    assert main(["export", str(run / "adapter"), str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    classify = pipeline("text-classification", model=str(merged), top_k=None)
    scores = [{row["label"]: row["score"] for row in rows} for rows in classify(TEXTS)]
    assert all(set(s) == {"negative", "positive"} for s in scores)
    # the same probabilities as the run's own predictions: merged weights, same tokenizer
    expected = predict_texts(run, TEXTS, precision="fp32")  # an export is a plain fp32 model
    for got, want in zip(scores, expected):
        assert got == pytest.approx(want["probabilities"], abs=1e-5)
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["label2id"]["positive"] == 1
    assert AutoTokenizer.from_pretrained(merged).vocab == AutoTokenizer.from_pretrained(tiny_model_dir).vocab
    card = (merged / "README.md").read_text()
    assert front_matter(card) == {"library_name": "transformers", "base_model": str(tiny_model_dir),
                                  "tags": ["deltatune", "lora"], "pipeline_tag": "text-classification"}
    assert "- Method: lora (" in card and "r=8" in card and "- Labels: 0 = negative, 1 = positive" in card
    assert "| test_accuracy |" in card and "## Not known" not in card
    mask = os.umask(0)
    os.umask(mask)
    assert {f.stat().st_mode & 0o777 for f in merged.iterdir()} == {0o666 & ~mask}


def section(card: str, title: str) -> list[str]:
    """The lines of one ``## title`` section of a model card, blank lines dropped."""
    body = card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in body.splitlines() if line]


def test_the_card_states_the_run_line_by_line(run, tmp_path, tiny_model_dir):
    assert main(["export", str(run / "adapter"), str(tmp_path / "merged")]) == 0
    card = (tmp_path / "merged" / "README.md").read_text()
    report = json.loads((run / "report.json").read_text())
    config = yaml.safe_load((run / "run.yaml").read_text())
    assert f"# lora merged into {tiny_model_dir.name}\n" in card
    made = section(card, "How it was made")
    assert made[0] == f"- Base model: `{tiny_model_dir}`"
    assert made[1] == ("- Method: lora (modules_to_save=['bert.pooler', 'classifier'], r=8, lora_alpha=16, "
                       "lora_dropout=0.0, target_modules=None, bias='none', use_rslora=False, use_dora=False, "
                       "init='kaiming')")
    assert made[2].startswith("- Merged and saved by `deltatune export` (deltatune ") and made[2].endswith(
        ") from a deltatune-format adapter")
    assert made[3:] == ["- Tokenizer: the base model's, saved beside the weights",
                        f"- Task: classification, trained on `{config['data']['train_file']}`",
                        f"- Training: 2 steps, learning rate 0.001, batch size 16, seed {config['training']['seed']}; "
                        f"the adapter of step {report['best_step']}, the best on validation",
                        "- Labels: 0 = negative, 1 = positive",
                        f"- Trainable parameters: {report['parameters']['trainable']:,} of "
                        f"{report['parameters']['total']:,} ({report['parameters']['trainable_percent']:.2f}%)"]
    metrics = sorted((k, v) for k, v in report["metrics"].items())
    assert section(card, "Metrics") == ["Measured by the run: `eval_*` on its validation split at the best step, "
                                        "`test_*` on its test split.", "| metric | value |", "|---|---|",
                                        *(f"| {k} | {v:.4f} |" for k, v in metrics)]
    assert section(card, "Use") == ["```python", "from transformers import pipeline",
                                    'pipe = pipeline("text-classification", model="PATH/TO/THIS/FOLDER")', "```"]
    assert section(card, "The run's configuration")[:2] == [f"From `{run / 'run.yaml'}`:", "```yaml"]


def test_inspect_names_the_base_model_the_adapter_was_saved_from(run, tiny_model_dir):
    assert inspect_adapter(run / "adapter").splitlines()[2] == f"base model:  {tiny_model_dir} (BertForSequenceClassification)"


def test_a_run_folder_exports_as_its_adapter(run, tmp_path):
    assert main(["export", str(run), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["id2label"]["1"] == "positive"


def test_an_export_of_a_bare_adapter_says_what_is_unknown(run, tmp_path):
    shutil.copytree(run / "adapter", tmp_path / "bare")
    assert main(["export", str(tmp_path / "bare"), str(tmp_path / "merged")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "merged").id2label == {0: "LABEL_0", 1: "LABEL_1"}  # not invented
    card = (tmp_path / "merged" / "README.md").read_text()
    assert front_matter(card)["tags"] == ["deltatune", "lora"]
    assert "## Metrics" not in card and "## The run's configuration" not in card
    assert section(card, "Not known") == [
        "This model was exported from a bare adapter folder, without the run that trained it (no `run.yaml` beside "
        "it), so this card cannot say:",
        "- the label names: `config.json` holds transformers' placeholders (LABEL_0, LABEL_1); set `id2label` and "
        "`label2id` there if you know them;", "- the training data and hyperparameters;", "- any metrics."]


def test_a_peft_format_adapter_exports_to_the_same_model(run, tmp_path):
    assert main(["convert", str(run / "adapter"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert "(BertForSequenceClassification)" in inspect_adapter(tmp_path / "peft")
    in_peft = peft.AutoPeftModel.from_pretrained(tmp_path / "peft")  # peft reads the class recorded for it
    assert type(in_peft.get_base_model()).__name__ == "BertForSequenceClassification"
    assert main(["export", str(tmp_path / "peft"), str(tmp_path / "from-peft")]) == 0
    assert main(["export", str(run / "adapter"), str(tmp_path / "native")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "native")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = [AutoModelForSequenceClassification.from_pretrained(tmp_path / name).eval()(**batch).logits
                   for name in ("from-peft", "native")]
    assert_close_ulps(outputs[0], outputs[1])


def test_a_peft_adapter_with_a_task_type_loads_its_head(run, tmp_path):
    """peft's own files name the head by task_type (auto_mapping only without one)."""
    assert main(["convert", str(run / "adapter"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "auto_mapping": None, "task_type": "SEQ_CLS"}))
    assert "(AutoModelForSequenceClassification)" in inspect_adapter(tmp_path / "peft")
    assert main(["export", str(tmp_path / "peft"), str(tmp_path / "merged")]) == 0


def run_copy(run, tmp_path, change) -> Path:
    """A copy of the run folder whose run.yaml ``change`` rewrites."""
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    change(folder / "run.yaml")
    return folder


def test_a_damaged_run_config_is_named_with_the_fix(run, tmp_path):
    folder = run_copy(run, tmp_path, lambda path: path.write_text("data: [unclosed"))
    with pytest.raises(dt.AdapterFileError, match=r"(?s)run\.yaml' cannot be read .*fix: restore it, or use a copy "
                                                 r"of the adapter folder without its run"):
        export_merged(folder, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_labels_that_do_not_fit_the_head_are_refused(run, tmp_path):
    def three_labels(path):
        config = yaml.safe_load(path.read_text())
        config["resolved"]["labels"] = ["negative", "neutral", "positive"]
        path.write_text(yaml.safe_dump(config))
    folder = run_copy(run, tmp_path, three_labels)
    with pytest.raises(dt.AdapterFileError, match=r"(?s)run\.yaml names 3 labels, but the adapter's head has 2 "
                                                 r"outputs\..*fix: export the adapter this run wrote"):
        export_merged(folder, tmp_path / "merged")


def test_a_base_without_a_tokenizer_exports_the_model_and_says_so(tmp_path):
    base = tmp_path / "base"
    AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "bert", vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=2)).save_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    dt.apply(model, dt.LoraConfig(r=2))
    dt.save_adapter(model, tmp_path / "adapter")
    export_merged(tmp_path / "adapter", tmp_path / "merged")
    assert not list((tmp_path / "merged").glob("tokenizer*")) and not (tmp_path / "merged" / "vocab.txt").exists()
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "- Tokenizer: not included (the base model folder has none)\n" in card
    (base / "tokenizer_config.json").write_text("{damaged")  # a tokenizer transformers cannot read
    export_merged(tmp_path / "adapter", tmp_path / "again")
    assert "- Tokenizer: not included" in (tmp_path / "again" / "README.md").read_text()


class Encoder(BertModel):
    """A model class whose name tells peft nothing of its task."""


def test_a_prompt_for_a_model_peft_has_no_task_type_for_has_no_peft_form(tmp_path):
    model = Encoder(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32))
    dt.apply(model, dt.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(dt.AdapterFileError, match=r"(?s)peft needs a task_type to apply a prompt or prefix, and "
                                                 r"deltatune knows none for the base model class 'Encoder'\..*fix: "
                                                 r"save the adapter from a transformers model with a task head "
                                                 r"\(e\.g\. \.\.\.ForCausalLM, \.\.\.ForSequenceClassification\)\.$"):
        dt.save_adapter(model, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()


def peft_copy(run, tmp_path, **changes) -> Path:
    """The run's adapter converted to the peft format, with ``changes`` made to its adapter_config.json
    (a value None removes the key)."""
    folder = tmp_path / "peft"
    assert main(["convert", str(run / "adapter"), str(folder), "--to", "peft"]) == 0
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_a_base_that_is_not_a_local_folder_asks_for_base(run, tmp_path, tiny_model_dir):
    folder = peft_copy(run, tmp_path, base_model_name_or_path=str(tmp_path / "gone"))
    with pytest.raises(dt.AdapterFileError, match=r"(?s)the base model of '.*peft' is not a local folder "
                                                 r"\('.*gone'\)\..*fix: pass --base with the folder of the base model"):
        export_merged(folder, tmp_path / "merged")
    export_merged(folder, tmp_path / "merged", base=str(tiny_model_dir))
    assert AutoConfig.from_pretrained(tmp_path / "merged").architectures == ["BertForSequenceClassification"]
    assert front_matter((tmp_path / "merged" / "README.md").read_text())["base_model"] == str(tiny_model_dir)


def test_a_model_class_transformers_lacks_is_named(run, tmp_path):
    folder = peft_copy(run, tmp_path, task_type=None, auto_mapping={"base_model_class": "BertForNothing",
                                                                    "parent_library": "transformers"})
    with pytest.raises(dt.AdapterFileError, match=r"(?s)transformers has no model class 'BertForNothing'\..*fix: "
                                                 r"pass --base and upgrade transformers"):
        export_merged(folder, tmp_path / "merged")


def test_an_adapter_without_its_model_class_that_fits_no_model_says_how_to_fix_it(run, tmp_path):
    folder = peft_copy(run, tmp_path, task_type=None, auto_mapping=None)
    with pytest.raises(dt.AdapterFileError, match=r"(?s)does not record its model class, and it does not fit "
                                                 r"BertModel: .*fix: convert it again from the deltatune adapter with "
                                                 r"this version of deltatune, or add the task_type peft uses"):
        export_merged(folder, tmp_path / "merged")


def test_the_runs_config_overrides_reach_the_exported_config(run, tmp_path):
    def overrides(path):
        config = yaml.safe_load(path.read_text())
        config["model"]["config_overrides"] = {"hidden_dropout_prob": 0.25}
        path.write_text(yaml.safe_dump(config))
    export_merged(run_copy(run, tmp_path, overrides), tmp_path / "merged")
    exported = AutoConfig.from_pretrained(tmp_path / "merged")
    assert exported.hidden_dropout_prob == 0.25 and exported.id2label == {0: "negative", 1: "positive"}


RUN_CARD = """---
library_name: transformers
base_model: org/bert-base
tags:
- deltatune
- lora
pipeline_tag: text-classification
---

# lora merged into bert-base

A `BertForSequenceClassification`: the base model's weights with a **lora** adapter merged in. Plain transformers \
loads it, without deltatune or peft.

## How it was made

- Base model: `org/bert-base` (weights from `/weights/bert`)
- Method: lora (r=2, target_modules=['query'])
- Merged and saved by `deltatune export` (deltatune {version}) from a peft-format adapter
- Tokenizer: the base model's, saved beside the weights
- Task: classification, trained on `train.csv`
- Training: 40 steps, learning rate 0.001, batch size 8, seed 3; the adapter of step 30, the best on validation
- Labels: 0 = LABEL_0, 1 = LABEL_1, 2 = LABEL_2
- Trainable parameters: 1,234 of 100,000 (1.23%)

## Metrics

Measured by the run: `eval_*` on its validation split at the best step, `test_*` on its test split.

| metric | value |
|---|---|
| eval_accuracy | 0.8750 |
| eval_f1 | 0.5000 |

## Use

```python
from transformers import pipeline

pipe = pipeline("text-classification", model="PATH/TO/THIS/FOLDER")
```

## The run's configuration

From `/runs/r1/run.yaml`:

```yaml
model:
  name_or_path: org/bert-base
task:
  type: classification
data:
  train_file: train.csv
training:
  learning_rate: 0.001
  batch_size: 8
  seed: 3
```
"""


def test_the_whole_card_of_a_run_word_for_word():
    """The run's model name is the base; the folder the weights came from is said beside it;
    the run's config in its own key order; metrics sorted, non-numbers left out."""
    from deltatune.io.export import model_card
    from deltatune.io.run_folder import RunRecord as Run
    from deltatune.version import __version__
    from tiny import build

    run = Run(Path("/runs/r1"), {"model": {"name_or_path": "org/bert-base"}, "task": {"type": "classification"},
                                 "data": {"train_file": "train.csv"},
                                 "training": {"learning_rate": 0.001, "batch_size": 8, "seed": 3}},
              {"steps": 40, "best_step": 30, "parameters": {"trainable": 1234, "total": 100000, "trainable_percent": 1.234},
               "metrics": {"eval_f1": 0.5, "eval_accuracy": 0.875, "note": "x"}})
    description = {"format": "peft", "config": {"method": "lora", "r": 2, "target_modules": ["query"]},
                   "base_model_name_or_path": "/weights/bert"}
    assert model_card(description, build("bert"), run, None, True) == RUN_CARD.format(version=__version__)


def test_a_card_of_a_run_that_recorded_little_says_what_it_does_not_know():
    from deltatune.io.export import model_card
    from deltatune.io.run_folder import RunRecord as Run

    run = Run(Path("/runs/r2"), {"data": {"source": "sst2"}}, {"metrics": {}})
    card = model_card({"format": "deltatune", "config": {"method": "lora"}}, build_plain(), run, None, False)
    assert section(card, "How it was made")[4:] == [
        "- Task: unknown, trained on `sst2`",
        "- Training: ? steps, learning rate None, batch size None, seed None; the adapter of step ?, the best on validation"]
    assert section(card, "Metrics") == ["None: the run stopped before its final evaluation."]


def build_plain():
    from torch import nn

    return type("Toy", (nn.Module,), {})()


def test_a_card_without_a_run_or_a_head_claims_no_labels_and_no_pipeline():
    from torch import nn

    from deltatune.io.export import model_card

    description = {"format": "deltatune", "config": {"method": "ia3"}, "base_model_name_or_path": "/base"}
    body = type("BertModel", (nn.Module,), {})()
    body.config = type("Config", (), {"id2label": {0: "LABEL_0"}})()  # transformers gives every config labels
    card = model_card(description, body, None, "/base", False)
    assert front_matter(card) == {"library_name": "transformers", "base_model": "/base", "tags": ["deltatune", "ia3"],
                                  "pipeline_tag": "feature-extraction"}
    assert section(card, "How it was made")[0] == "- Base model: `/base`"  # no "(weights from" the same folder
    assert section(card, "How it was made")[3] == "- Tokenizer: not included (the base model folder has none)"
    assert section(card, "Not known")[1:] == ["- the training data and hyperparameters;", "- any metrics."]
    assert "\n\n## Not known\n\nThis model was exported from a bare adapter folder" in card
    toy = model_card({**description, "base_model_name_or_path": None}, build_plain(), None, None, False)
    assert front_matter(toy) == {"library_name": "transformers", "base_model": "unknown", "tags": ["deltatune", "ia3"]}
    assert "## Use" not in toy and "# ia3 merged into unknown\n" in toy


def test_an_adapter_that_records_its_class_but_fits_no_module_is_not_blamed_on_the_class(run, tmp_path):
    folder = peft_copy(run, tmp_path, target_modules=["nosuch"])
    with pytest.raises(dt.AdapterFileError) as info:
        export_merged(folder, tmp_path / "merged")
    assert "does not fit BertForSequenceClassification: target_modules entry 'nosuch' matches no module" in \
        info.value.message and "does not record its model class" not in info.value.message


def test_a_run_without_a_report_or_with_a_config_that_is_no_mapping_still_exports(run, tmp_path):
    folder = run_copy(run, tmp_path, lambda path: None)
    (folder / "report.json").unlink()
    export_merged(folder, tmp_path / "merged")
    card = (tmp_path / "merged" / "README.md").read_text()
    assert section(card, "Metrics") == ["None: the run stopped before its final evaluation."]
    (folder / "run.yaml").write_text("- a list, not a mapping\n")
    export_merged(folder, tmp_path / "again")
    assert "- Task: unknown, trained on `unknown`" in (tmp_path / "again" / "README.md").read_text()


@pytest.mark.parametrize("config", [dt.FullFineTuningConfig(), dt.BitFitConfig(modules_to_save=["classifier"])],
                         ids=["full", "bitfit"])
def test_methods_that_train_base_weights_export_them(tmp_path, tiny_model_dir, config):
    """Full fine-tuning changed the base itself (nothing to merge: export unloads), BitFit merges its biases."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    dt.apply(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    dt.save_adapter(model, tmp_path / "adapter")
    export_merged(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[2, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_an_export_reads_the_adapter_files_once(run, tmp_path, monkeypatch):
    from deltatune.io import adapter_files, export

    reads = []
    real = adapter_files.read_adapter
    monkeypatch.setattr(export, "read_adapter", lambda path: reads.append(path) or real(path))
    monkeypatch.setattr(adapter_files, "read_adapter", lambda path: reads.append(path) or real(path))
    export_merged(run, tmp_path / "merged")
    assert reads == [run / "adapter"]


def test_every_command_finds_runs_and_adapters_by_one_rule(run, tmp_path):
    from deltatune.core.errors import ConfigError
    from deltatune.io.run_folder import Located, find_run, locate, read_record

    assert locate(run) == Located(run / "adapter", run)
    assert locate(run / "adapter") == Located(run / "adapter", run)  # a run's adapter knows its run
    (tmp_path / "link").symlink_to(run / "adapter")
    assert locate(tmp_path / "link") == Located(tmp_path / "link", run)  # shown as given, run found resolved
    assert locate(tmp_path) == Located(tmp_path, None)
    assert find_run(run / "adapter") == run
    record = read_record(run)
    assert record.labels == ["negative", "positive"] and record.report["steps"] == 2
    bare = tmp_path / "bare"
    dt.save_adapter(dt.apply(build("bert"), dt.LoraConfig(r=2)), bare)
    with pytest.raises(ConfigError, match="(?s)not a deltatune run folder.*a bare adapter has no task"):
        find_run(bare)

"""Merged export from a real (tiny) run: label names, tokenizer and model card travel with the
model; peft-format adapters export to the same model as deltatune's own."""

from __future__ import annotations

import json
import os
import shutil

import peft
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, pipeline

from deltatune.cli import main
from deltatune.io.convert import inspect_adapter
from deltatune.train.config import load_config
from deltatune.train.inference import predict_texts
from deltatune.train.loop import train

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
    expected = predict_texts(run, TEXTS)
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


def test_a_run_folder_exports_as_its_adapter(run, tmp_path):
    assert main(["export", str(run), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["id2label"]["1"] == "positive"


def test_an_export_of_a_bare_adapter_says_what_is_unknown(run, tmp_path):
    shutil.copytree(run / "adapter", tmp_path / "bare")
    assert main(["export", str(tmp_path / "bare"), str(tmp_path / "merged")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "merged").id2label == {0: "LABEL_0", 1: "LABEL_1"}  # not invented
    card = (tmp_path / "merged" / "README.md").read_text()
    assert front_matter(card)["tags"] == ["deltatune", "lora"]
    assert "## Not known" in card and "the label names" in card and "## Metrics" not in card


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
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)


def test_a_peft_adapter_with_a_task_type_loads_its_head(run, tmp_path):
    """peft's own files name the head by task_type (auto_mapping only without one)."""
    assert main(["convert", str(run / "adapter"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "auto_mapping": None, "task_type": "SEQ_CLS"}))
    assert "(AutoModelForSequenceClassification)" in inspect_adapter(tmp_path / "peft")
    assert main(["export", str(tmp_path / "peft"), str(tmp_path / "merged")]) == 0

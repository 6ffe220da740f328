"""Bad input: one clear message naming the problem and the fix, exit code 2, no traceback,
nothing written. Each row: what the user did, and a phrase the message must contain."""

from __future__ import annotations

import pytest

from deltatune.cli import main
from tiny import file_hashes

# (id, --set overrides for `deltatune train`, expected phrase in the error)
CONFIG_CASES = [
    ("unknown-top-key", ["trainer.epochs=1"], "unknown key 'trainer'"),
    ("unknown-training-key", ["training.lerning_rate=1e-3"], "did you mean 'learning_rate'"),
    ("unknown-data-key", ["data.text_col=x"], "unknown key 'data.text_col'"),
    ("wrong-type-float", ["training.epochs=abc"], "training.epochs = 'abc' has the wrong type"),
    ("wrong-type-int", ["training.batch_size=[1]"], "training.batch_size"),
    ("wrong-literal", ["training.lr_scheduler=exp"], "'linear' | 'cosine' | 'constant'"),
    ("wrong-precision", ["training.precision=fp8"], "'auto' | 'fp32' | 'bf16' | 'fp16'"),
    ("wrong-mixed-precision", ["training.mixed_precision=fp8"], "mixed_precision = 'fp8' is not one of no"),
    ("fp16-on-cpu", ["training.precision=fp16"], "fp16 needs a CUDA device"),
    ("both-precisions", ["training.mixed_precision=bf16", "training.precision=fp32"], "both set"),
    ("unknown-method", ["method.method=lora2"], "unknown method 'lora2'"),
    ("misspelt-method", ["method.method=lorra"], "did you mean 'lora'"),
    ("unknown-method-key", ["method.rank=8"], "unknown key 'method.rank'"),
    ("rank-zero", ["method.r=0"], "lora.r = 0 is out of range: must be at least 1."),
    ("rank-negative", ["method.r=-4"], "lora.r = -4 is out of range"),
    ("rank-string", ["method.r=eight"], "lora.r = 'eight' has the wrong type"),
    ("dropout-one", ["method.lora_dropout=1.0"], "must be at least 0 and below 1."),
    ("dropout-negative", ["method.lora_dropout=-0.1"], "lora.lora_dropout = -0.1 is out of range"),
    ("bias-mode", ["method.bias=some"], "lora.bias"),
    ("targets-empty", ["method.target_modules=[]"], "target_modules is empty"),
    ("target-typo", ["method.target_modules=[qurey]"], "did you mean one of: query"),
    ("target-wrong-type", ["method.target_modules=[LayerNorm]"], "which lora cannot adapt"),
    ("bottleneck-too-big", ["method.method=adapter", "method.bottleneck=5000"], "bottleneck"),
    ("activation-unknown", ["method.method=adapter", "method.activation=swishy"], "activation"),
    ("placement-unknown", ["method.method=adapter", "method.placement=middle"], "placement"),
    ("prompt-zero-tokens", ["method.method=prompt", "method.num_virtual_tokens=0"], "num_virtual_tokens"),
    ("prompt-text-without-text", ["method.method=prompt", "method.init=text"], "init_text"),
    ("layer-top-k-zero", ["method.method=layer", "method.top_k=0"], "top_k = 0 is out of range"),
    ("layer-top-k-too-many", ["method.method=layer", "method.top_k=99"], "the model has 2 blocks"),
    ("ia3-ff-not-subset", ["method.method=ia3", "method.target_modules=[key]",
                           "method.feedforward_modules=[value]"], "feedforward_modules"),
    ("max-length-too-long", ["model.max_length=100000"], "longer than this model allows"),
    ("model-missing", ["model.name_or_path=/no/such/model"], "never downloads from the hub"),
    ("model-hub-name", ["model.name_or_path=bert-base-uncased"], "local folder"),
    ("text-column-missing", ["data.text_column=sentence"], "no column 'sentence' (data.text_column)"),
    ("task-column-missing", ["task.type=causal_lm", "task.prompt_column=instruction"],
     "no column 'instruction' (task.prompt_column)"),
    ("label-column-missing", ["data.label_column=target"], "no column 'target'"),
    ("label-outside-set", ["data.labels=[good,bad]"], "not in the label set"),
    ("train-file-missing", ["data.train_file=/no/such.csv"], "does not exist"),
    ("unknown-task", ["task.type=translation"], "unknown task.type"),
    ("no-eval-samples", ["data.max_eval_samples=0"], "data.max_eval_samples = 0 is out of range"),
    # Found by a user: epochs=-1 trained 0 steps and wrote an untrained adapter; batch_size=0
    # ended in a ZeroDivisionError. Every numeric key has a declared range, checked up front.
    ("epochs-negative", ["training.epochs=-1"], "training.epochs = -1 is out of range: must be greater than 0."),
    ("batch-size-zero", ["training.batch_size=0"], "training.batch_size = 0 is out of range: must be at least 1."),
    ("logging-steps-zero", ["training.logging_steps=0"], "training.logging_steps = 0 is out of range"),
    ("learning-rate-nan", ["training.learning_rate=.nan"], "must be a finite number at least 0."),
    ("validation-size-whole", ["data.validation_size=1"], "data.validation_size = 1 is out of range"),
    ("seed-negative", ["training.seed=-1"], "training.seed = -1 is out of range: must be from 0 to 4294967295."),
    ("qa-n-best-zero", ["task.type=qa", "task.n_best=0"], "task.n_best = 0 is out of range"),
    ("set-malformed", ["training.epochs"], "is not of the form key.path=value"),
]


@pytest.fixture
def base_args(tiny_model_dir, sentiment_csv, tmp_path):
    return ["--set", f"model.name_or_path={tiny_model_dir}", "--set", f"data.train_file={sentiment_csv}",
            "--set", "model.max_length=32", "--set", f"training.output_dir={tmp_path / 'run'}",
            "--set", "training.progress=false"]


def run_cli(args, capsys) -> str:
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("overrides,phrase", [pytest.param(o, p, id=i) for i, o, p in CONFIG_CASES])
def test_bad_config_gets_one_clear_error(overrides, phrase, base_args, tmp_path, capsys):
    args = ["train", *base_args]
    for item in overrides:
        args += ["--set", item]
    err = run_cli(args, capsys)
    assert phrase in err
    assert err.startswith("error: ") and "fix:" in err
    assert file_hashes(tmp_path) == {}, "nothing may be written on bad input"


def _csv(tmp_path, text: str):
    path = tmp_path / "data.csv"
    path.write_text(text)
    return path


DATA_CASES = [
    ("empty-dataset", "text,label\n", "has no data rows"),
    ("one-label", "text,label\n" + "a b c,x\n" * 40, "1 label(s)"),
    ("unknown-extension", None, "unknown extension"),
]


@pytest.mark.parametrize("name,content,phrase", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_files(name, content, phrase, base_args, tmp_path, capsys):
    path = _csv(tmp_path, content) if content is not None else tmp_path / "data.xlsx"
    if content is None:
        path.write_text("x")
    before = file_hashes(tmp_path)
    err = run_cli(["train", *base_args, "--set", f"data.train_file={path}"], capsys)
    assert phrase in err
    assert file_hashes(tmp_path) == before, "nothing may be written on bad input"


def test_output_dir_that_is_a_file(base_args, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine")
    before = file_hashes(tmp_path)
    err = run_cli(["train", *base_args, "--set", f"training.output_dir={target}"], capsys)
    assert "is a file" in err
    assert file_hashes(tmp_path) == before, "nothing may be written on bad input"


def test_output_dir_under_a_file(base_args, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    before = file_hashes(tmp_path)
    err = run_cli(["train", *base_args, "--set", f"training.output_dir={blocker / 'run'}"], capsys)
    assert "not a writable folder" in err
    assert file_hashes(tmp_path) == before, "nothing may be written on bad input"


@pytest.mark.parametrize("made", [[], ["run"], ["run", "run/checkpoints"]])
def test_resume_without_checkpoints(made, base_args, tmp_path, capsys):
    for folder in made:
        (tmp_path / folder).mkdir()
    before = file_hashes(tmp_path)
    assert "holds no checkpoint" in run_cli(["train", *base_args, "--resume"], capsys)
    assert file_hashes(tmp_path) == before, "nothing may be written on bad input"


def test_missing_config_file(capsys, tmp_path):
    assert "does not exist" in run_cli(["train", str(tmp_path / "nope.yaml")], capsys)


def test_config_file_that_is_not_yaml(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    assert "is not valid YAML" in run_cli(["train", str(path)], capsys)


def test_eval_of_a_folder_that_is_no_run(capsys, tmp_path):
    assert "not a deltatune run folder" in run_cli(["eval", str(tmp_path)], capsys)


def test_debug_shows_the_traceback(capsys, tmp_path):
    from deltatune import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError):  # after the command too
        main(["train", str(tmp_path / "nope.yaml"), "--debug"])
    assert "does not exist" in run_cli(["train", str(tmp_path / "nope.yaml")], capsys)  # no traceback without it

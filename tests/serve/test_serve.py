"""deltatune serve: many runs' adapters over one tiny base, mixed traffic batched together.

Every served answer must equal what ``predict_texts`` gives for the same input with the run
alone; requests for different adapters must share batches and forward passes; a bad request
is refused on its own, a model failure fails only its request, and SIGTERM answers the request
in flight before the server exits 0.
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from conftest import sentiment_rows
from fastapi.testclient import TestClient

from deltatune.cli import main
from deltatune.serve.app import create_app
from deltatune.serve.registry import Registry, instance_key
from deltatune.serve.requests import Settings
from deltatune.train.config import load_config
from deltatune.train.inference import predict_texts, read_run
from deltatune.train.loop import train

TEXTS = ["a great film", "an awful and boring film that goes on and on", "quite wonderful music"]
# run name -> (method, labels its data uses): "ia3" names its labels otherwise; "three" has a wider head;
# "layer" (layer tuning) cannot share a pass with other adapters
RUNS = {"lora": ("lora", ["negative", "positive"]), "ia3": ("ia3", ["bad", "good"]),
        "prompt": ("prompt", ["negative", "positive"]), "three": ("lora", ["negative", "neutral", "positive"]),
        "layer": ("layer", ["negative", "positive"])}


def write_rows(path: Path, labels: list[str]) -> Path:
    rows = sentiment_rows(48)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({"text": row["text"], "label": labels[i % len(labels)]})
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Five short runs on the tiny base, trained fast enough (no warm-up, a large step) to differ."""
    root = tmp_path_factory.mktemp("runs")
    for name, (method, labels) in RUNS.items():
        data = write_rows(root / f"{name}.csv", labels)
        train(load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.max_length=32", f"method={method}",
                                 f"data.train_file={data}", "data.max_train_samples=16", "data.max_eval_samples=4",
                                 f"training.output_dir={root / name}", "training.max_steps=2",
                                 "training.batch_size=8", "training.warmup_steps=0", "training.learning_rate=0.05",
                                 "training.progress=false"]))
    return {name: root / name for name in RUNS}


@pytest.fixture(scope="module")
def expected(runs) -> dict[str, list[dict]]:
    """What each run alone predicts for TEXTS, in fp32: batches of other rows round alike there."""
    return {name: predict_texts(folder, TEXTS, precision="fp32") for name, folder in runs.items()}


@pytest.fixture(scope="module")
def registry(runs) -> Registry:
    registry = Registry(runs["lora"], precision="fp32")
    for name, folder in runs.items():
        registry.load(name, folder)
    return registry


def client(registry: Registry, **settings) -> TestClient:
    return TestClient(create_app(registry, Settings(**settings)))


def predict(http, adapter: str, inputs: list) -> httpx.Response:
    return http.post("/v1/predict", json={"adapter": adapter, "inputs": inputs})


def concurrently(*calls) -> list:
    """Each call on a thread of its own, started together; their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def assert_same(served: list[dict], alone: list[dict]) -> None:
    assert [row["label"] for row in served] == [row["label"] for row in alone]
    for got, want in zip(served, alone):
        assert got["probabilities"].keys() == want["probabilities"].keys()
        assert all(abs(got["probabilities"][k] - want["probabilities"][k]) <= 1e-5 for k in want["probabilities"]), \
            (got, want)


def test_mixed_requests_share_batches_and_each_answer_equals_its_run_alone(registry, expected):
    with client(registry, max_wait_ms=800) as http:
        replies = concurrently(*[lambda name=name: predict(http, name, TEXTS) for name in RUNS])
        stats = http.get("/health").json()["stats"]
    for name, reply in zip(RUNS, replies):
        assert reply.status_code == 200 and reply.json()["adapter"] == name
        assert_same(reply.json()["outputs"], expected[name])
    assert {r["label"] for r in replies[1].json()["outputs"]} <= {"bad", "good"}  # ia3's own labels
    assert expected["lora"] != expected["ia3"]  # the runs differ, so a mix-up would show
    # one batch of five requests: lora, ia3 and prompt share a forward pass; layer (it replaces
    # whole blocks) and three (another head width) are on model instances of their own
    assert stats["batches"] == 1 and stats["multi_adapter_batches"] == 1
    assert stats["forward_passes"] == 3 and stats["multi_adapter_passes"] == 1
    assert len({served.instance.key for served in registry.adapters.values()}) == 3


def test_an_adapter_that_trains_base_biases_gets_a_base_of_its_own(runs):
    """LoRA with bias='all' writes its biases into the base it is loaded into: in the shared copy,
    every other adapter would see them."""
    folder, config, task, _ = read_run(runs["lora"])
    biased = dataclasses.replace(config, method=dataclasses.replace(config.method, bias="all"))
    assert instance_key("lora", config, task, "fp32") == instance_key("other", config, task, "fp32")  # plain LoRA runs share
    assert instance_key("biased", biased, task, "fp32") != instance_key("lora", config, task, "fp32")


def test_a_run_is_served_in_its_own_precision_unless_told_otherwise(runs):
    """By default each run computes as it trained (run.yaml records the precision auto chose);
    --precision bf16 holds the base in bf16 beside the adapter's fp32 weights, and answers as
    the run's own predictions in bf16 do."""
    own = Registry(runs["lora"])
    own.load("lora", runs["lora"])
    assert own.adapters["lora"].instance.key[-1] == read_run(runs["lora"])[3].precision
    registry = Registry(runs["lora"], precision="bf16")
    registry.load("lean", runs["lora"])
    lean = registry.adapters["lean"].instance
    assert lean.key[-1] == "bf16"
    assert {p.dtype for n, p in lean.model.named_parameters() if ".deltas." not in n} == {torch.bfloat16}
    # LoRA's matrices keep fp32; the head's copy takes the base's dtype (autocast rounds a linear
    # layer's fp32 weights to bf16 alike)
    assert {p.dtype for n, p in lean.model.named_parameters() if "lora_" in n} == {torch.float32}
    with client(registry) as http:
        served = predict(http, "lean", TEXTS).json()["outputs"]
    alone = predict_texts(runs["lora"], TEXTS, precision="bf16")
    assert [row["label"] for row in served] == [row["label"] for row in alone]
    for got, want in zip(served, alone):  # the same rows in one batch: at most bf16's rounding (2^-8) apart
        assert all(abs(got["probabilities"][k] - want["probabilities"][k]) <= 2 ** -8 for k in want["probabilities"])


def test_bad_requests_get_a_4xx_message_and_leave_their_batch_alone(registry, expected):
    bad = [({"adapter": "nope", "inputs": ["a"]}, 404, "no adapter named 'nope'"),
           ({"adapter": "lora", "inputs": []}, 400, "no inputs"),
           ({"adapter": "lora", "inputs": ["fine", "  "]}, 400, "inputs[1] is empty"),
           ({"adapter": "lora", "inputs": ["x" * 101]}, 413, "inputs[0] has 101 characters"),
           ({"adapter": "lora", "inputs": ["a"] * 5}, 413, "5 inputs; this server takes at most 4"),
           ({"adapter": "lora", "inputs": [{"words": "no text column"}]}, 400, "cannot read these inputs"),
           ({"adapter": "lora", "inputs": [3]}, 400, "inputs[0] is 3"),
           ({"adapter": "lora"}, 400, "inputs: field required"),
           ({"adapter": "lora", "inputs": ["a"], "extra": 1}, 400, "extra: extra inputs are not permitted")]
    with client(registry, max_wait_ms=300, max_inputs=4, max_input_chars=100) as http:
        replies = concurrently(lambda: predict(http, "lora", TEXTS),
                               *[lambda body=body: http.post("/v1/predict", json=body) for body, _, _ in bad],
                               lambda: http.post("/v1/predict", content=b'{"adapter": "lora", "inputs": [',
                                                 headers={"content-type": "application/json"}),
                               lambda: http.post("/v1/predict", content=b'{"adapter": "lora", "inputs": ["a"]}',
                                                 headers={"content-type": "application/x-www-form-urlencoded"}))
        batched = http.get("/health").json()["stats"]["requests"]
    assert batched == 1  # every bad request was refused before it could join a batch
    assert replies[0].status_code == 200
    assert_same(replies[0].json()["outputs"], expected["lora"])
    unparsed = [(None, 400, "not valid JSON"), (None, 400, "not a JSON object (send it with Content-Type")]
    for (body, status, message), reply in zip(bad + unparsed, replies[1:]):
        assert reply.status_code == status and message in reply.json()["error"], (body, reply.json())
        assert reply.json()["hint"]


def edited_copy(run: Path, folder: Path, section: str, key: str, value) -> Path:
    """A copy of ``run`` whose run.yaml says ``section.key: value``."""
    shutil.copytree(run, folder)
    config = yaml.safe_load((folder / "run.yaml").read_text())
    config[section][key] = value
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_adapters_load_and_unload_while_serving(registry, runs, expected, tmp_path):
    elsewhere = edited_copy(runs["ia3"], tmp_path / "other-base", "model", "name_or_path", "minilm-l6")
    # a run whose files do not fit: a 3-label head that its run.yaml says has 2 labels
    misfit = edited_copy(runs["three"], tmp_path / "misfit", "resolved", "labels", ["negative", "positive"])
    with client(registry) as http:
        loaded = http.post("/v1/adapters", json={"name": "ia3-again", "path": str(runs["ia3"])})
        assert loaded.status_code == 201 and loaded.json()["method"] == "ia3"
        assert "ia3-again" in [a["name"] for a in http.get("/v1/adapters").json()["adapters"]]
        assert_same(predict(http, "ia3-again", TEXTS).json()["outputs"], expected["ia3"])
        refusals = [(http.post("/v1/adapters", json={"name": "lora", "path": str(runs["ia3"])}), 409, "already loaded"),
                    (http.post("/v1/adapters", json={"name": "x", "path": str(elsewhere)}), 422,
                     "trained on base model 'minilm-l6'"),
                    (http.post("/v1/adapters", json={"name": "x", "path": str(misfit)}), 422,
                     "in the file but (2,) in this model"),
                    (http.post("/v1/adapters", json={"name": "x", "path": str(tmp_path)}), 422, "not a deltatune run"),
                    (http.post("/v1/adapters", json={"name": "a/b", "path": str(runs["ia3"])}), 400, "cannot name")]
        for reply, status, message in refusals:
            assert reply.status_code == status and message in reply.json()["error"], reply.json()
        assert http.delete("/v1/adapters/ia3-again").status_code == 200
        assert predict(http, "ia3-again", TEXTS).status_code == 404
        assert http.delete("/v1/adapters/ia3-again").status_code == 404
        for name in ("ia3", "lora"):  # the neighbours are intact
            assert_same(predict(http, name, TEXTS).json()["outputs"], expected[name])


def test_a_model_failure_fails_only_its_request_and_the_server_goes_on(registry, expected):
    model = registry.get("lora").instance.model
    poison = registry.get("lora").instance.tokenizer.convert_tokens_to_ids("explode")

    def refuse_poison(module, args, kwargs):
        if (kwargs["input_ids"] == poison).any():
            raise RuntimeError("a row the model cannot take")

    hook = model.register_forward_pre_hook(refuse_poison, with_kwargs=True)
    try:
        with client(registry, max_wait_ms=800) as http:
            good, failed = concurrently(lambda: predict(http, "lora", TEXTS), lambda: predict(http, "ia3", ["explode"]))
            stats = http.get("/health").json()["stats"]
            assert good.status_code == 200 and failed.status_code == 500
            assert "RuntimeError: a row the model cannot take" in failed.json()["error"]
            assert_same(good.json()["outputs"], expected["lora"])
            assert stats["failed_passes"] == 2  # the shared pass, then the poisoned request alone
            assert_same(predict(http, "ia3", TEXTS).json()["outputs"], expected["ia3"])
    finally:
        hook.remove()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_real_server_answers_the_request_in_flight_on_sigterm_then_exits_0(runs, expected):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "serve", "--adapter", f"lora={runs['lora']}",
                               "--port", str(port), "--max-wait-ms", "2000", "--precision", "fp32"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(httpx.post, f"{url}/v1/predict", json={"adapter": "lora", "inputs": TEXTS}, timeout=30)
            time.sleep(0.5)  # the request now waits up to 2 s for others to join its batch
            server.send_signal(signal.SIGTERM)
            reply = reply.result()
        assert reply.status_code == 200
        assert_same(reply.json()["outputs"], expected["lora"])
        assert server.wait(timeout=30) == 0, server.stderr.read()
    finally:
        server.kill()
        server.wait()
        server.stderr.close()


def test_the_command_line_says_what_is_wrong_before_loading_anything(capsys):
    for argv, message in [(["--adapter", "no-equals-sign"], "--adapter no-equals-sign: expected NAME=RUN"),
                          ([], "serve needs a base model or at least one adapter"),
                          (["--adapter", "a=runs/a", "--max-batch", "0"], "--max-batch 0: it must be at least 1")]:
        assert main(["serve", *argv]) == 2
        assert message in capsys.readouterr().err

"""training.distributed: fsdp. Two CPU processes (gloo, torchrun) hold half of every weight each
and train what one process trains on the same global batch; a killed sharded run resumes to the
same weights; what cannot shard is refused before anything loads."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from deltatune.core.errors import ConfigError
from deltatune.train.config import RunConfig, load_config
from deltatune.train.loop import train
from deltatune.train.sharding import check_shardable
from tiny import assert_close_ulps

TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("sharded_runs.py")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")

#: every method that trains sharded, each small enough to train in seconds on the tiny BERT
METHODS = {
    "lora": {"method": "lora", "r": 4},
    "full": {"method": "full"},
    "ia3": {"method": "ia3"},
    "adapter": {"method": "adapter", "bottleneck": 8},
    "prompt": {"method": "prompt", "num_virtual_tokens": 4, "init": "random"},
    "prefix": {"method": "prefix", "num_virtual_tokens": 4},
    "loha": {"method": "loha", "r": 4},
    "lokr": {"method": "lokr", "r": 4},
    "oft": {"method": "oft", "oft_block_size": 8},
    "vera": {"method": "vera", "r": 8},
    "bitfit": {"method": "bitfit"},
    "layer": {"method": "layer", "top_k": 1},
    "ln_tuning": {"method": "ln_tuning"},
}


def _settings(model: str, method: dict, data, out: Path, learning_rate: float, **training) -> dict:
    return {
        # dropout off: two processes draw other masks than one process does
        "model": {"name_or_path": str(model), "max_length": 32, "dropout": 0.0},
        # 64 training rows: 4 steps of 16 rows, 8 per process (or 2 batches of 8 accumulated in one)
        "data": {"train_file": str(data), "max_train_samples": 64, "validation_size": 0.1, "test_size": 0.1},
        "method": method,
        "training": {"output_dir": str(out), "batch_size": 8, "epochs": 1, "learning_rate": learning_rate,
                     "warmup_steps": 0, "progress": False, "group_by_length": False, "precision": "fp32",
                     "distributed": "fsdp", **training},
    }


def _write(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def _one_process(settings: dict) -> dict:
    """The same run in one process, two batches of 8 accumulated into each step of 16."""
    single = copy.deepcopy(settings)
    single["training"].update(distributed="ddp", gradient_accumulation_steps=2,
                              output_dir=settings["training"]["output_dir"] + "-single")
    return single


def _launch(configs: list[Path], *flags: str, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    # one thread each: the one-process runs then use the same kernels as each of the two processes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", "29547"] if processes == 2 else [sys.executable]
    done = subprocess.run([*launcher, str(WORKER), *map(str, configs), *flags], env=env, timeout=900,
                          capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _adapter(folder: Path) -> dict:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_model_dir, sentiment_csv):
    """Every method on the tiny BERT, and LoRA and full fine-tuning on the bundled MiniLM (4 steps),
    trained sharded in one launch of two processes and unsharded in one process:
    {name: (settings, sharded run's folder, one-process run's folder)}."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = {name: _settings(tiny_model_dir, method, sentiment_csv, root / name, 5e-3, max_grad_norm=None)
            for name, method in METHODS.items()}
    for name, rate in (("lora", 5e-3), ("full", 5e-5)):
        runs[f"minilm-{name}"] = _settings("minilm-l6", METHODS[name], sentiment_csv, root / f"minilm-{name}", rate,
                                           max_grad_norm=None)
    runs["minilm-lora-clipped"] = _settings("minilm-l6", METHODS["lora"], sentiment_csv, root / "minilm-lora-clipped",
                                            5e-3, max_grad_norm=1.0)
    singles = {name: _one_process(settings) for name, settings in runs.items()}
    _launch([_write(root / f"{name}.yaml", settings) for name, settings in runs.items()])
    _launch([_write(root / f"{name}-single.yaml", settings) for name, settings in singles.items()], processes=1)
    return {name: (settings, root / name, Path(singles[name]["training"]["output_dir"]))
            for name, settings in runs.items()}


@needs_torchrun
@pytest.mark.slow
@pytest.mark.parametrize("name", [*METHODS, "minilm-lora", "minilm-full"])
def test_two_sharded_processes_train_what_one_process_trains(sharded, name):
    _, folder, single = sharded[name]
    report = yaml.safe_load((folder / "report.json").read_text())
    assert report["steps"] == 4 and report["processes"] == 2
    one, two = _adapter(single), _adapter(folder)
    assert one.keys() == two.keys()
    for key in one:
        # Each batch of 8 runs the same kernels in either run, and one process halving its two
        # batches' gradients and adding them equals two adding theirs and halving the sum (both
        # exact in fp32): the gradients agree bit for bit. AdamW's fused kernel may not: it
        # updates a shard, half a tensor, and rounds elements past its last full vector in
        # another path (measured: 0 ulps for all but the bottleneck adapter's 8-element biases,
        # 0.8 ulps). Bound: an ulp of the largest value per step, 4 steps, 4x margin. (Without
        # gradient clipping: see the next test.)
        assert_close_ulps(two[key], one[key], ulps=16, msg=f"{name}: {key}")
    single_report = yaml.safe_load((single / "report.json").read_text())
    assert report["parameters"]["trainable"] == single_report["parameters"]["trainable"]
    assert report["parameters"]["stored_bytes"] == single_report["parameters"]["stored_bytes"]
    # each process holds half of the frozen weights (FSDP pads a shard to an even split: a few bytes more)
    frozen_one, frozen_two = single_report["parameters"]["frozen_bytes"], report["parameters"]["frozen_bytes"]
    assert frozen_one / 2 <= frozen_two <= frozen_one / 2 + 4 * 1024 or frozen_one == 0
    assert report["eval_accuracy"] == single_report["eval_accuracy"]
    # the test split is evaluated after the best adapter was copied back into the shards
    assert report["test_accuracy"] == single_report["test_accuracy"]
    # each process's last batch is filled up with repeated rows: the loss counts every row once
    for split in ("eval_loss", "test_loss"):
        assert report[split] == pytest.approx(single_report[split], rel=64 * torch.finfo(torch.float32).eps)


@needs_torchrun
@pytest.mark.slow
def test_clipped_gradients_agree_to_the_adam_steps_rounding(sharded):
    settings, folder, single = sharded["minilm-lora-clipped"]
    one, two = _adapter(single), _adapter(folder)
    # Clipping sums the squared gradients shard by shard, in another order than over whole
    # tensors: the clip factor differs in its last bits. AdamW divides most of that out, but an
    # element whose gradient is near zero can take its step of up to learning_rate the other way.
    # Bound: 0.5% of the most an element can move in 4 steps (measured: 1.2e-6 to 2.7e-5 of 1e-4).
    bound = 0.005 * settings["training"]["learning_rate"] * 4
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=bound, msg=key)


@needs_torchrun
@pytest.mark.slow
def test_a_killed_sharded_run_resumes_to_the_same_weights(sharded, tmp_path):
    settings = sharded["lora"][0]
    settings = copy.deepcopy(settings)
    settings["training"].update(output_dir=str(tmp_path / "killed"), eval_steps=2)
    config = _write(tmp_path / "killed.yaml", settings)
    uninterrupted = copy.deepcopy(settings)
    uninterrupted["training"]["output_dir"] = str(tmp_path / "whole")
    _launch([_write(tmp_path / "whole.yaml", uninterrupted)])

    died = _launch([config], "--die-after-eval", check=False)
    assert died.returncode != 0
    killed = tmp_path / "killed"
    assert not (killed / "report.json").exists()
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step-00000002"]
    _launch([config], "--resume")

    for name in ("trainable", "optimizer"):
        resumed = load_file(killed / "checkpoints" / "step-00000004" / f"{name}.safetensors")
        expected = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / f"{name}.safetensors")
        assert resumed.keys() == expected.keys()
        for key in expected:  # the same processes doing the same arithmetic: bit for bit
            assert torch.equal(resumed[key], expected[key]), key


def test_fsdp_in_one_process_is_refused_naming_the_launch(tmp_path, tiny_model_dir, sentiment_csv):
    settings = _settings(tiny_model_dir, METHODS["lora"], sentiment_csv, tmp_path / "run", 5e-3)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node") as error:
        train(load_config(_write(tmp_path / "run.yaml", settings)))
    assert "distributed: ddp" in error.value.hint
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method, quantization, reason", [
    ({"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 10}, None, "rank allocator"),
    ({"method": "lora"}, {"load_in_4bit": True}, "quantised base"),
])
def test_what_cannot_shard_is_refused_with_the_reason(method, quantization, reason):
    config = RunConfig.from_dict({"method": method, "model": {"quantization": quantization} if quantization else {},
                                  "training": {"distributed": "fsdp"}})
    with pytest.raises(ConfigError, match=reason) as error:
        check_shardable(config, processes=2)
    assert "distributed: ddp" in error.value.hint


def test_an_unknown_distributed_strategy_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match="ddp.*fsdp"):
        RunConfig.from_dict({"training": {"distributed": "zero3"}})

"""Two CPU processes (DDP over gloo, launched by torchrun) train to the single-process result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from deltatune.train.config import load_config
from deltatune.train.loop import train
from tiny import REORDERED, assert_close_ulps

pytestmark = pytest.mark.slow


def _settings(csv, out):
    return {
        # Dropout off: the two processes draw different masks than one process would.
        "model": {"name_or_path": "minilm-l6", "max_length": 32, "dropout": 0.0},
        "data": {"train_file": str(csv), "max_train_samples": 160, "validation_size": 0.1, "test_size": 0.1},
        "method": {"method": "lora", "r": 4},
        "training": {"output_dir": str(out), "batch_size": 8, "epochs": 1, "learning_rate": 5e-3,
                     "progress": False, "group_by_length": False,
                     # fp32: the bound below is in fp32 ulps; under bf16 (auto on AVX-512 BF16 and AMX CPUs)
                     # one batch of 16 and two of 8 round apart by bf16 steps (AMX kernels block by rows)
                     "precision": "fp32"},
    }


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_processes_match_one_process_with_accumulation(tmp_path, sentiment_csv):
    single = _settings(sentiment_csv, tmp_path / "single")
    single["training"]["gradient_accumulation_steps"] = 2  # one step sees the same 16 examples
    (tmp_path / "single.yaml").write_text(yaml.safe_dump(single))
    one = train(load_config(tmp_path / "single.yaml"))

    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(_settings(sentiment_csv, tmp_path / "ddp")))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "deltatune.cli",
                    "train", str(tmp_path / "ddp.yaml")], check=True, env=env, timeout=600,
                   capture_output=True)

    ddp = yaml.safe_load((tmp_path / "ddp" / "report.json").read_text())
    assert ddp["steps"] == one.steps == 10  # 160 training rows / 16 per step
    a = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    for key in a:
        # two processes sum the gradients in another order and ten AdamW steps carry that rounding on
        assert_close_ulps(a[key], b[key], ulps=10 * REORDERED)

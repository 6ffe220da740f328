"""The one YAML reader: YAML 1.2 plain scalars for files and --set alike; the writer round-trips."""

from __future__ import annotations

import math

import pytest
import yaml

from deltatune.compare.config import load_compare_config
from deltatune.core.errors import ConfigError
from deltatune.core.yaml12 import dumps, loads
from deltatune.train.config import load_config


def test_plain_scalars_resolve_by_yaml_1_2():
    data = loads("a: 5e-2\nb: no\nc: yes\nd: on\ne: off\nf: true\ng: False\nh: 1e3\ni: 0x1f\nj: 0o17\n"
                 "k: -.inf\nl: .nan\nm: 10\nn: +3\no: ~\np: 2026-12-07\nq: [1e-4, 'no']\n")
    assert data["a"] == 0.05 and data["h"] == 1000.0 and isinstance(data["h"], float)
    assert [data[k] for k in "bcde"] == ["no", "yes", "on", "off"]
    assert data["f"] is True and data["g"] is False
    assert (data["i"], data["j"], data["m"], data["n"]) == (31, 15, 10, 3)
    assert data["k"] == -math.inf and math.isnan(data["l"]) and data["o"] is None
    assert data["p"] == "2026-12-07"  # YAML 1.2's core schema has no dates
    assert data["q"] == [1e-4, "no"]


@pytest.mark.parametrize("value", ["5e-2", "1e3", "no", "yes", "on", "off", "2026-12-07", "null", "~", "True",
                                   "0x1f", ".inf", "12", "1_000", "=", ""])
def test_the_writer_quotes_every_string_either_schema_would_misread(value):
    text = dumps({"key": value, "number": 1e-5, "flag": True})
    assert loads(text) == {"key": value, "number": 1e-5, "flag": True}
    assert yaml.safe_load(text) == {"key": value, "number": 1e-5, "flag": True}  # a YAML 1.1 reader too


def test_set_reads_numbers_without_a_dot_and_accelerates_no(tmp_path):
    config = load_config(None, ["method.lora_dropout=5e-2", "training.mixed_precision=no",
                                "training.learning_rate=3e-4", "data.labels=[no, yes]"])
    assert config.method.lora_dropout == 0.05 and config.training.precision == "fp32"
    assert config.training.learning_rate == 3e-4 and config.data.labels == ["no", "yes"]
    path = tmp_path / "run.yaml"
    path.write_text("method:\n  method: lora\n  lora_dropout: 5e-2\ntraining:\n  mixed_precision: no\n")
    config = load_config(path)
    assert config.method.lora_dropout == 0.05 and config.training.precision == "fp32"


def test_a_compare_file_reads_its_rates_by_yaml_1_2(tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text(f"output_dir: {tmp_path}\nmethods:\n  - {{method: lora, learning_rate: 3e-3}}\n")
    [entry] = load_compare_config(path).methods
    assert entry["learning_rate"] == 3e-3


def test_a_quoted_number_is_a_string_and_refused_by_type():
    with pytest.raises(ConfigError, match="training.learning_rate"):
        load_config(None, ["training.learning_rate='3e-4'"])


def test_a_set_value_that_is_not_yaml_is_one_clear_error():
    with pytest.raises(ConfigError, match="--set 'data.labels=\\[a, b': the value is not YAML"):
        load_config(None, ["data.labels=[a, b"])

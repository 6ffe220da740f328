"""The one YAML reader and writer: PyYAML with YAML 1.2's core schema for plain scalars.

PyYAML resolves plain scalars by YAML 1.1, where ``5e-2`` is a string (a float needs a dot),
``no``, ``yes``, ``on``, ``off`` are booleans and ``2026-12-07`` is a date. Configs, ``--set``
values and run folders are read here by YAML 1.2: ``5e-2`` is a float, ``no`` a string, only
``true``/``false`` are booleans, dates stay text. The writer quotes any string that either
schema would read as something else, so the files it writes read back the same in any reader.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

#: YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution)
_CORE_SCHEMA = [
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
     r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
]
_REPLACED = {tag for tag, _, _ in _CORE_SCHEMA} | {"tag:yaml.org,2002:timestamp"}  # 1.2 has no dates


class _Loader(yaml.SafeLoader):
    """SafeLoader whose plain scalars resolve by YAML 1.2's core schema."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_yaml_int(self, node: yaml.Node) -> int:
        text = self.construct_scalar(node)
        base = 8 if text.startswith("0o") else 16 if text.startswith("0x") else 10
        return int(text[2:] if base != 10 else text, base)

    def construct_yaml_float(self, node: yaml.Node) -> float:
        text = self.construct_scalar(node).lower()
        return float(text.replace(".inf", "inf").replace(".nan", "nan"))


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings YAML 1.2 would read as numbers, booleans or null."""

    yaml_implicit_resolvers = {first: list(resolvers)
                               for first, resolvers in yaml.SafeDumper.yaml_implicit_resolvers.items()}


for _tag, _pattern, _firsts in _CORE_SCHEMA:
    _Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_firsts))
    _Dumper.add_implicit_resolver(_tag, re.compile(_pattern), list(_firsts))
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


def loads(text: str) -> Any:
    """The data of a YAML document, plain scalars by YAML 1.2 (``yaml.YAMLError`` when malformed)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def dumps(data: Any) -> str:
    """``data`` as block YAML in the order given, readable back by ``loads`` and by YAML 1.1 readers."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def read_yaml(path: str | Path) -> Any:
    """The data of a YAML file (``{}`` when empty).

    Raises:
        ConfigError: the file is missing or not YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist.", "pass the path of a YAML file.")
    try:
        return loads(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"'{path}' is not valid YAML: {error}.",
                          "fix the line the message names (indentation, a ':' after each key).") from error

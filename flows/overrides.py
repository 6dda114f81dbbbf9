"""Parameter overrides of a flow run (`--set KEY=VALUE`, the Prefect UI's `overrides`): parsed, applied to
the params and validated with every section before any stage starts, and written into params.yaml (comments
kept) as `dvc exp run -S` does, so that DVC sees the change."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from alignment.config import ConfigError, read_params
from flows.config import SECTIONS, check_sections, parse


def set_dotted(params: dict, key: str, value: Any) -> None:
    """`set_dotted(p, "sft.train.learning_rate", 3e-4)`; a number indexes a list
    (`prepare.sources.0.limit`)."""
    *parents, last = key.split(".")
    node = params
    try:
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    except (AttributeError, IndexError, TypeError, ValueError):  # through a scalar, or a bad list index
        raise ConfigError(f"override {key}: no such key") from None


def validated(params_path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every section of params (with overrides applied), validated: a bad key fails before any stage."""
    params = read_params(params_path)
    check_sections(params, params_path)
    for key, value in overrides.items():
        if key.split(".")[0] not in SECTIONS:
            raise ConfigError(f"override {key}: unknown section; known: {sorted(SECTIONS)}")
        set_dotted(params, key, value)
    return {name: parse(name, params.get(name), params_path) for name in SECTIONS}


def write_overrides(params_path: Path, overrides: dict[str, Any]) -> None:
    """Round-trip edit of params.yaml, so that its comments and key order survive."""
    yaml = YAML()  # round-trip mode
    yaml.indent(mapping=2, sequence=4, offset=2)  # the file's own layout: list items indented under their key
    yaml.width = 4096  # never re-wrap a long flow-style list
    yaml.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    params = yaml.load(params_path)
    for key, value in overrides.items():
        set_dotted(params, key, value)
    yaml.dump(params, params_path)


def parse_overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` arguments as overrides, each value parsed as YAML (`3e-4`, `null`, `[a, b]`)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item}: expected KEY=VALUE")
        overrides[key] = YAML(typ="safe").load(value)
    return overrides

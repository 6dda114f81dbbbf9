"""Parameter overrides of a flow run (`--set KEY=VALUE`, the Prefect UI's `overrides`): parsed, checked
against the allow-list, applied to the params and validated with every section before any stage starts,
and written into params.yaml (comments kept) as `dvc exp run -S` does, so that DVC sees the change.

Overrides are data, never code or places. A flow run (anyone who can start one in the UI) may set a key
whose type in the params schema is a number, a boolean or a fixed choice (`Literal`), or a list of those:
strengths, seeds, sizes, steps, stage switches. Every free string (paths, URLs, model ids, environment-
variable names, the experiment name), every mapping (work pools, `evaluate.models`, launchers) and
`trust_remote_code` comes only from the committed params: what a flow run reads, calls, loads and where it
runs is decided by a commit, never by a parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from ruamel.yaml import YAML

from alignment.config import ConfigError, read_params
from alignment.data.io import atomic_write
from flows.config import SECTIONS, check_sections, parse

# booleans that run code: `true` loads a hub repository's own Python
CODE_SWITCHES = frozenset({"trust_remote_code"})
KEY_PART = re.compile(r"^[A-Za-z0-9_]+$")


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


def _without_none(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def _is_data(annotation: Any) -> bool:
    """A number, a boolean, a fixed choice, or a list / tuple / union of those."""
    options = _without_none(annotation)
    if len(options) > 1:
        return all(_is_data(option) for option in options)
    (annotation,) = options
    if annotation in (int, float, bool) or get_origin(annotation) is Literal:
        return True
    if get_origin(annotation) in (tuple, list):
        return all(_is_data(arg) for arg in get_args(annotation) if arg is not Ellipsis)
    return False  # str, a mapping, a whole sub-section, Any


def field_type(key: str) -> Any:
    """The schema's type of the dotted params key `key` (a number indexes a list); ConfigError when there
    is no such key."""
    section, *parts = key.split(".")
    if section not in SECTIONS:
        raise ConfigError(f"override {key}: unknown section; known: {sorted(SECTIONS)}")
    annotation: Any = SECTIONS[section]
    for part in parts:
        options = _without_none(annotation)
        inner = options[0] if len(options) == 1 else annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel) and part in inner.model_fields:
            annotation = inner.model_fields[part].annotation
        elif get_origin(inner) in (tuple, list) and part.isdigit():
            annotation = get_args(inner)[0]
        elif get_origin(inner) is dict:
            annotation = dict  # a free mapping (pools, models, iterations): its entries are not data
        else:
            raise ConfigError(f"override {key}: no such key")
    return annotation


def check_allowed(overrides: dict[str, Any]) -> None:
    """ConfigError naming the first override a flow run may not set (see the module docstring)."""
    for key in overrides:
        if not isinstance(key, str) or not all(KEY_PART.match(part) for part in key.split(".")):
            raise ConfigError(f"override {key!r}: a dotted params key of letters, digits and _ expected")
        annotation = field_type(key)
        if key.rsplit(".", 1)[-1] in CODE_SWITCHES or not _is_data(annotation):
            raise ConfigError(
                f"override {key}: not allowed from a flow run. A run may set numbers, booleans and fixed "
                "choices (strengths, seeds, sizes); paths, URLs, model ids, environment-variable names, "
                "mappings (work pools, models), whole sections and trust_remote_code come only from the "
                "committed params: change them in a commit"
            )


def validated(params_path: Path, overrides: dict[str, Any], from_run: bool = True) -> dict[str, Any]:
    """Every section of params (with overrides applied), validated: a bad key fails before any stage.
    `from_run`: the overrides come from a flow run's parameters and must pass `check_allowed` (False for
    settings the committed params make, such as a sweep point's)."""
    if from_run:
        check_allowed(overrides)
    params = read_params(params_path)
    check_sections(params, params_path)
    for key, value in overrides.items():
        if key.split(".")[0] not in SECTIONS:
            raise ConfigError(f"override {key}: unknown section; known: {sorted(SECTIONS)}")
        set_dotted(params, key, value)
    return {name: parse(name, params.get(name), params_path) for name in SECTIONS}


def write_overrides(params_path: Path, overrides: dict[str, Any]) -> None:
    """Round-trip edit of params.yaml, so that its comments and key order survive; written to a temporary
    file and renamed over the old one, so that a kill mid-write leaves the old file whole."""
    yaml = YAML()  # round-trip mode
    yaml.indent(mapping=2, sequence=4, offset=2)  # the file's own layout: list items indented under their key
    yaml.width = 4096  # never re-wrap a long flow-style list
    yaml.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    params = yaml.load(params_path)
    for key, value in overrides.items():
        set_dotted(params, key, value)
    with atomic_write(params_path) as handle:
        yaml.dump(params, handle)


SERVED_ROOT_ENV = "ALIGNMENT_SERVED_ROOT"  # set by `python -m flows.serve`: the one folder its runs work in


def project_paths(root: str | None, params_file: str) -> tuple[Path, Path]:
    """A flow run's project folder and params file, from its `root` and `params_file` parameters. The
    params file is a relative path under the folder (no `..`) that git tracks there: a run reads the
    committed params, never a file of the caller's choosing. A run of a served deployment works in the
    folder `serve` runs in, whatever `root` says."""
    project = Path(root or ".").resolve()
    served = os.environ.get(SERVED_ROOT_ENV)
    if served and project != Path(served).resolve():
        raise ConfigError(f"root {root!r}: the served flows work in {served} only")
    relative = Path(params_file)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ConfigError(f"params_file {params_file!r}: a relative path inside {project} expected")
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "--", str(relative)], cwd=project, capture_output=True
    )
    if tracked.returncode:
        raise ConfigError(f"params_file {params_file!r}: not a file git tracks in {project}")
    return project, project / relative


def for_logging(overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides as MLflow params of their own (`override.<key>`), each through the tracking module's
    secret filter, instead of one JSON string that would pass it by."""
    return {f"override.{key}": json.dumps(value) for key, value in overrides.items()}


def parse_overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` arguments as overrides, each value parsed as YAML (`3e-4`, `null`, `[a, b]`)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item}: expected KEY=VALUE")
        overrides[key] = YAML(typ="safe").load(value)
    return overrides

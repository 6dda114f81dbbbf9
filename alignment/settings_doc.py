"""A stage's settings as `python -m alignment <stage> --help` lists them: every dotted key of its params
section with its default and a one-line doc, read from the config classes of alignment/config.py (the
docstring under a field, else the comment beside it), and the resolved section as YAML
(`python -m alignment config <stage>`)."""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
import types
import typing
from functools import cache
from pathlib import Path

from pydantic import BaseModel
from ruamel.yaml import YAML

from alignment.config import Section


@cache
def field_docs(cls: type[BaseModel]) -> dict[str, str]:
    """Field name -> its doc in the class body (base classes first, so a subclass's own doc wins): the
    string literal after the field, or the comments on the field's lines."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if not (isinstance(base, type) and issubclass(base, BaseModel)) or base in (BaseModel, Section):
            continue
        source = textwrap.dedent(inspect.getsource(base))
        comments: dict[int, str] = {}
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                comments[token.start[0]] = token.string.lstrip("#").strip()
        body = ast.parse(source).body[0].body
        for statement, following in zip(body, [*body[1:], None]):
            if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
                continue
            docstring = (
                following.value.value
                if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                else None
            )
            lines = [comments[n] for n in range(statement.lineno, statement.end_lineno + 1) if n in comments]
            text = docstring if isinstance(docstring, str) else " ".join(lines)
            if text:
                docs[statement.target.id] = " ".join(text.split())
    return docs


def _section_class(annotation) -> type[Section] | None:
    """The Section class a field holds (`X`, `X | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, Section)]
        return found[0] if len(found) == 1 else None
    return None


def settings(
    cls: type[Section], defaults: BaseModel | None = None, prefix: str = ""
) -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) of every setting of `cls`, sub-sections flattened. A sub-section's
    defaults are those of the instance its parent gives it (ReST's `improve.train` has its own
    learning rate); a sub-section that is None by default is listed with its keys' own defaults."""
    rows = []
    docs = field_docs(cls)
    for name, field in cls.model_fields.items():
        if defaults is not None:
            default = getattr(defaults, name)
        elif field.default_factory is not None:
            default = field.default_factory()
        else:
            default = field.default
        sub = _section_class(field.annotation)
        if sub is not None:
            about = docs.get(name) or " ".join((sub.__dict__.get("__doc__") or "").split())
            rows.append((f"{prefix}{name}", "null" if default is None else "", about))
            rows += settings(sub, default if isinstance(default, sub) else None, f"{prefix}{name}.")
            continue
        shown = "(required)" if defaults is None and field.is_required() else _yaml_inline(default)
        rows.append((f"{prefix}{name}", shown, docs.get(name, "")))
    return rows


def _yaml_inline(value) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    return str(value)


def stage_help(stage: str, section: str, cls: type[Section], description: str = "", module: str = "") -> str:
    """The text of `python -m alignment <stage> --help`: usage, what the stage does (`description`, else
    its config class's own docstring), then one line per setting: key, default, the doc's first sentence."""
    about = description or (cls.__dict__.get("__doc__") or "").split("\n\n")[0]
    if not about.strip() and module:  # the stage module's docstring, read without importing it (torch)
        path = Path(__file__).parent.parent / (module.replace(".", "/") + ".py")
        about = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").split("\n\n")[0]
    lines = [f"usage: python -m alignment {stage} [--params FILE] [--no-tracking]", ""]
    if about.strip():
        lines += [*textwrap.wrap(" ".join(about.split()), 100), ""]
    lines += [
        f"settings: section `{section}` of the params file, with their defaults (`python -m alignment",
        f"config {stage} --params FILE` prints the section as that file resolves it):",
    ]
    rows = settings(cls)
    width = min(max(len(key) for key, _, _ in rows), 40)
    for key, default, text in rows:
        head = f"  {key:<{width}}  {default}"
        first = text.split(". ")[0].split("; ")[0].rstrip(".")
        lines.append(f"{head:<{width + 20}}  {first}".rstrip() if first else head.rstrip())
    lines += [
        "",
        "options:",
        "  --params FILE   the params file (default: params.yaml)",
        "  --no-tracking   do not log to MLflow",
    ]
    return "\n".join(lines)


def resolved_yaml(section: str, cfg: BaseModel) -> str:
    """The resolved section, defaults filled in, as YAML a params file could hold."""
    stream = io.StringIO()
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    yaml.dump({section: cfg.model_dump(mode="json")}, stream)
    return stream.getvalue()

"""`python -m alignment <stage> --help` lists the stage's settings with defaults and docs from the config
classes; `python -m alignment config <stage>` prints the resolved section, every default filled in."""

from __future__ import annotations

import re

import pytest
from conftest import MICRO
from ruamel.yaml import YAML

from alignment import registry
from alignment.__main__ import main
from alignment.config import flatten
from alignment.settings_doc import field_docs, settings


def lines_of(capsys, argv: list[str]) -> dict[str, str]:
    assert main(argv) == 0
    return {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}


def test_stage_help_lists_each_setting_with_its_default_and_doc(capsys):
    shown = lines_of(capsys, ["sft", "--help"])
    assert shown["model.dtype"].split()[1] == "float32" and "the weights' dtype" in shown["model.dtype"]
    assert "rank of each weight update" in shown["lora.r"]  # a comment beside the field
    assert "False: the output folder holds the adapter" in shown["lora.merge_on_save"]  # a docstring under it
    assert (
        shown["train.learning_rate"].split()[1] == "0.001"
        and shown["register_as"].split()[1] == "alignment-sft"
    )
    # a sub-section's defaults are its parent's: ReST's Improve trains at 1e-4
    assert lines_of(capsys, ["rest_iter", "--help"])["improve.train.learning_rate"].split()[1] == "0.0001"


@pytest.mark.parametrize("stage", list(registry.STAGES))
def test_every_stage_help_covers_its_whole_section(stage, capsys):
    """Every key of the section, as the micro profile resolves it, has a line of its own."""
    shown = lines_of(capsys, [stage, "--help"])
    cfg = registry.load_section(registry.STAGES[stage].params_section, MICRO)
    # a list of sections (prepare.sources) or a mapping by number (rest.iterations) is one setting
    keys = {re.sub(r"\.\d+(\..*)?$", "", key) for key in flatten(cfg)}
    assert keys <= set(shown), keys - set(shown)


def test_field_docs_reads_docstrings_and_comments_of_the_class_and_its_bases():
    from alignment.config import TrainConfig

    docs = field_docs(TrainConfig)
    assert docs["group_by_length"].startswith("k: length-grouped windows")  # TrainConfig's docstring
    assert docs["checkpoint_every"].startswith("optimizer steps (PPO: rollouts)")  # OptimizerConfig's comment
    assert ("seed", "0", "") in settings(TrainConfig)  # no doc: an empty one, not a neighbour's


def test_config_prints_the_resolved_section_as_yaml(capsys, tmp_path):
    assert main(["config", "dpo", "--params", str(MICRO)]) == 0
    printed = YAML(typ="safe").load(capsys.readouterr().out)
    resolved = registry.load_section("dpo", MICRO)
    assert printed == {"dpo": resolved.model_dump(mode="json")}
    assert printed["dpo"]["train"]["batch_size"] == resolved.train.batch_size  # a default filled in
    bad = tmp_path / "params.yaml"
    bad.write_text("dpo:\n  beta: -1\n")
    assert main(["config", "dpo", "--params", str(bad)]) == 2
    assert "dpo.beta" in capsys.readouterr().err

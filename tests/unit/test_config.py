"""params.yaml validation: errors name the file and the dotted key, before any compute."""

from pathlib import Path

import pytest

from alignment.config import ConfigError, SFTConfig, flatten
from flows.config import load_all, load_section, parse
from tests.conftest import ROOT, write_params


def test_the_shipped_params_are_valid():
    sections = load_all(ROOT / "params.yaml")
    assert isinstance(sections["sft"], SFTConfig)
    assert sections["sft"].train.learning_rate > 0


def test_yaml_1_2_floats_as_dvc_reads_them(tmp_path, micro_params):
    micro_params["sft"]["train"]["learning_rate"] = "1e-3"  # a string here; YAML writes it quoted
    path = tmp_path / "params.yaml"
    write_params(path, micro_params)
    path.write_text(path.read_text().replace("'1e-3'", "1e-3"))
    assert load_section("sft", path).train.learning_rate == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "section, patch, message",
    [
        ("sft", {"train": {"learning_rat": 0.1}}, "sft.train.learning_rat: Extra inputs are not permitted"),
        ("sft", {"train": {"batch_size": "many"}}, "sft.train.batch_size: Input should be a valid integer"),
        (
            "sft",
            {"train": {"batch_size": 0}},
            "sft.train.batch_size: Input should be greater than or equal to 1",
        ),
        (
            "sft",
            {"train": {"lr_schedule": "exp"}},
            "sft.train.lr_schedule: Input should be 'constant', 'linear' or 'cosine'",
        ),
        ("sft", {"model": {"n_embd": 30, "n_head": 4}}, "n_embd (30) must be divisible by n_head (4)"),
        ("sft", {"max_length": 4096}, "exceeds model.max_position_embeddings"),
        ("tokenizer", {"source": "pretrained"}, "source: pretrained needs name_or_path"),
        (
            "prepare",
            {"eval_fraction": 0.6, "test_fraction": 0.5},
            "eval_fraction + test_fraction must be below 1",
        ),
        (
            "rlaif",
            {"judge": {"backend": "openai"}},
            "rlaif.judge: Value error, backend openai needs openai.base_url and openai.model",
        ),
        ("rlaif", {"judge": {"transformers": {}}}, "backend transformers needs transformers.name_or_path"),
        (
            "rlaif",
            {"judge": {"openai": {"base_url": "localhost:8000"}}},
            "rlaif.judge.openai.base_url: String should match pattern '^https?://' (got 'localhost:8000')",
        ),
        (
            "rlaif",
            {"judge": {"transformers": {"name_or_path": "m", "batch_size": 0}}},
            "rlaif.judge.transformers.batch_size: Input should be greater than or equal to 1",
        ),
        ("rlaif", {"judge": {"name_or_path": "m"}}, "rlaif.judge.name_or_path: Extra inputs"),  # flat: gone
        (
            "dpo",
            {"loss_type": "ipo", "ipo_length_normalize": "sometimes"},
            "dpo.ipo_length_normalize: Input should be a valid boolean",
        ),
        (
            "dpo",
            {"ipo_length_normalize": False},
            "ipo_length_normalize applies to loss_type ipo only, not sigmoid",
        ),
        ("grpo", {"minibatch_size": 4}, "minibatch_size (4) must divide the generation batch"),
        (
            "grpo",
            {"samples_per_prompt": 1},
            "grpo.samples_per_prompt: Input should be greater than or equal to 2",
        ),
        (
            "grpo",
            {"loss_type": "gspo"},
            "grpo.loss_type: Input should be 'grpo', 'bnpo', 'dr_grpo' or 'dapo'",
        ),
        ("grpo", {"kl_in_reward": False}, "grpo.kl_in_reward: Extra inputs are not permitted"),
        (
            "rloo",
            {"prompts_per_batch": 9, "minibatch_size": 9},
            "prompts_per_batch (9) exceeds train_prompts (8)",
        ),
        ("rloo", {"reward": "gold", "source": "hh"}, "reward: gold is the IMDb gold scorer"),
        ("rloo", {"train": {"mixed_precision": "fp16"}}, "fp16 would need a loss scaler; use bf16"),
        (
            "sft",
            {"train": {"fused_adamw": True}},
            "sft.train.fused_adamw: Input should be 'auto', 'on' or 'off'",
        ),
        (
            "ppo",
            {"train": {"device": "cpu", "fused_adamw": "on"}},
            "ppo.train.fused_adamw: Value error, on needs a GPU, but device is cpu",
        ),
        ("dpo", {"train": {"compile": "maybe"}}, "dpo.train.compile: Input should be a valid boolean"),
        (
            "rm",
            {"train": {"gradient_checkpointing": "sometimes"}},
            "rm.train.gradient_checkpointing: Input should be a valid boolean",
        ),
    ],
)
def test_invalid_values_name_file_and_key(section, patch, message, micro_params):
    raw = micro_params[section]
    for key, value in patch.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError) as error:
        parse(section, raw, "some/params.yaml")
    assert "some/params.yaml" in str(error.value)
    assert message in str(error.value)


def test_gpu_knobs_are_off_or_auto_by_default(micro_params):
    """What a CPU run did before the knobs: no checkpointing, no compilation, AdamW as torch picks it."""
    for section in ("sft", "rm", "dpo", "brain", "ppo", "rloo"):
        train = parse(section, micro_params[section]).train
        assert (train.gradient_checkpointing, train.fused_adamw, train.compile) == (False, "auto", False)


def test_unknown_section_and_missing_file(tmp_path, micro_params):
    micro_params["sfft"] = {}
    path = tmp_path / "params.yaml"
    write_params(path, micro_params)
    with pytest.raises(ConfigError, match=r"params.yaml: unknown section\(s\) \['sfft'\]"):
        load_all(path)
    with pytest.raises(ConfigError, match="not found"):
        load_all(tmp_path / "missing.yaml")


def test_config_is_frozen(micro_params):
    cfg = parse("sft", micro_params["sft"])
    with pytest.raises(Exception):
        cfg.max_length = 3


def test_flatten_for_mlflow_params(micro_params):
    flat = flatten(parse("prepare", micro_params["prepare"]))
    assert flat["sources.0.name"] == "imdb" and flat["sources.1.kind"] == "hh"
    assert flat["eval_fraction"] == 0.1


def test_cli_fails_before_compute_on_invalid_params(tmp_path, micro_params, monkeypatch):
    from alignment.__main__ import main

    micro_params["sft"]["train"]["warmup_steps"] = -1
    write_params(tmp_path / "params.yaml", micro_params)
    monkeypatch.chdir(tmp_path)
    assert main(["sft"]) == 2
    assert not Path("outputs").exists() and not Path("mlflow.db").exists()

"""LoRA adapters: the reference is the same model with its adapter off, exactly; only the adapter trains;
saved adapters load back through the ordinary loaders; the config rejects bad values by key."""

import copy
import json
import math
import shutil
from importlib.util import find_spec

import pytest
import torch

from alignment.config import ConfigError, LoraConfig, ModelConfig
from alignment.losses.logprobs import IGNORE_INDEX, sequence_logps
from alignment.losses.preference_loss import dpo_loss
from alignment.models.generation import generate_ids
from alignment.models.loading import (
    build_model,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    save_pretrained,
    train_tokenizer,
)
from alignment.models.lora import add_adapter, reference_model, save_adapter, unwrap
from flows.config import parse

TEXTS = ["The film was wonderful.", "A dull, lifeless plot.", "\n\nHuman: hi\n\nAssistant: hello"] * 20
LORA = LoraConfig(r=4, alpha=8, dropout=0.1)  # dropout: the reference must still be deterministic


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)


def tiny(tokenizer, arch: str = "gpt2"):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layer=2, n_embd=32, n_head=2, max_position_embeddings=64)
    return build_model(cfg, tokenizer)


def batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 12 tokens; the first 4 are the prompt (no loss)."""
    ids = torch.tensor([tokenizer("The film was wonderful. A dull, lifeless plot.").input_ids[:12]] * 2)
    ids[1, 6:] = ids[1, 6:].flip(0)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    return ids, labels


def logps(model, ids, labels) -> torch.Tensor:
    return sequence_logps(model(input_ids=ids).logits, labels)


def train_step(model, ids, labels) -> None:
    """One AdamW step on the NLL, over every parameter as the shared trainer builds it (weight decay too)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    (-logps(model, ids, labels).mean()).backward()
    optimizer.step()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_off_gives_the_base_log_probs_exactly_also_after_training(arch, tokenizer):
    base = tiny(tokenizer, arch)
    frozen_copy = copy.deepcopy(base).eval()
    ids, labels = batch(tokenizer)
    with torch.no_grad():
        expected = logps(frozen_copy, ids, labels)
    policy = add_adapter(base, LORA)
    for _ in range(2):  # before and after a step that makes the adapter non-trivial
        with reference_model(policy) as reference:
            assert torch.equal(logps(reference, ids, labels), expected)
        train_step(policy, ids, labels)
    assert policy.training  # the training flag is back after the reference pass
    policy.eval()
    assert not torch.allclose(logps(policy, ids, labels), expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dpo_with_lora_starts_at_ln_2(arch, tokenizer):
    """A fresh adapter (B = 0) is the identity: policy = reference, delta = 0, -log sigmoid(0) = ln 2."""
    policy = add_adapter(tiny(tokenizer, arch), LORA).train()
    ids, labels = batch(tokenizer)
    chosen, rejected = ids[:1], ids[1:]
    with reference_model(policy) as reference:
        reference_chosen, reference_rejected = (
            logps(reference, chosen, labels[:1]),
            logps(reference, rejected, labels[1:]),
        )
    losses, _, _ = dpo_loss(
        logps(policy, chosen, labels[:1]),
        logps(policy, rejected, labels[1:]),
        reference_chosen,
        reference_rejected,
        beta=0.1,
    )
    assert abs(losses.item() - math.log(2)) < 1e-6


def test_a_step_changes_only_the_adapter(tokenizer):
    policy = add_adapter(tiny(tokenizer), LORA)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    train_step(policy, *batch(tokenizer))
    changed = {name for name, p in policy.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert changed == {name for name, p in policy.named_parameters() if p.requires_grad}


def test_saved_adapter_loads_back_and_samples_the_same(tokenizer, tmp_path):
    save_pretrained(tiny(tokenizer), tokenizer, tmp_path / "sft")
    policy = add_adapter(load_causal_lm(tmp_path / "sft"), LORA)
    ids, labels = batch(tokenizer)
    train_step(policy, ids, labels)
    save_adapter(policy, tokenizer, tmp_path / "dpo")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "dpo").iterdir()
    }
    assert not (tmp_path / "dpo" / "model.safetensors").exists()  # the adapter alone

    loaded = load_causal_lm(tmp_path / "dpo").eval()
    prompts = ["The film", "A dull", "hi"]
    sample = dict(max_new_tokens=8, temperature=1.0, seeds=[1, 2, 3])
    assert generate_ids(loaded, load_tokenizer(tmp_path / "dpo"), prompts, **sample) == generate_ids(
        policy, tokenizer, prompts, **sample
    )
    policy.eval()
    torch.testing.assert_close(loaded(ids).logits, policy(ids).logits, atol=1e-5, rtol=0)

    save_adapter(policy, tokenizer, tmp_path / "merged", merge=True)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()  # a plain model folder
    for folder in ("merged", "merged/adapter"):
        torch.testing.assert_close(
            load_causal_lm(tmp_path / folder)(ids).logits, policy(ids).logits, atol=1e-5, rtol=0
        )
    assert any("lora_" in name for name, _ in policy.named_parameters())  # the in-memory model keeps it


def test_relative_base_resolves_from_anywhere_and_adapters_chain(tokenizer, tmp_path, monkeypatch):
    """As a stage saves: the base `outputs/sft` relative to the project root; loaded from another working
    directory; an adapter trained on an adapter output records that folder as its base."""
    project = tmp_path / "project"
    save_pretrained(tiny(tokenizer), tokenizer, project / "outputs/sft")
    monkeypatch.chdir(project)
    first = add_adapter(load_causal_lm("outputs/sft"), LORA)
    ids, labels = batch(tokenizer)
    train_step(first, ids, labels)
    save_adapter(first, tokenizer, project / "outputs/dpo")
    second = add_adapter(load_causal_lm("outputs/dpo"), LORA)
    train_step(second, ids, labels)
    save_adapter(second, tokenizer, project / "outputs/rest")

    assert first.peft_config["default"].base_model_name_or_path == "outputs/sft"
    assert second.peft_config["default"].base_model_name_or_path == "outputs/dpo"
    monkeypatch.chdir(tmp_path)
    second.eval()
    torch.testing.assert_close(
        load_causal_lm(project / "outputs/rest")(ids).logits, second(ids).logits, atol=1e-5, rtol=0
    )


def test_an_adapter_records_its_base_by_a_path_that_resolves_outside_the_project(
    tokenizer, tmp_path, monkeypatch
):
    """adapter_config.json names the base by its absolute path (plain peft loads a copy of the folder from
    anywhere); base_model.json keeps `outputs/sft`, by which a moved checkout finds its own base."""
    from peft import AutoPeftModelForCausalLM

    project = tmp_path / "project"
    save_pretrained(tiny(tokenizer), tokenizer, project / "outputs/sft")
    monkeypatch.chdir(project)
    policy = add_adapter(load_causal_lm("outputs/sft"), LORA)
    train_step(policy, *batch(tokenizer))
    save_adapter(policy, tokenizer, project / "outputs/dpo")
    saved = json.loads((project / "outputs/dpo/adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str((project / "outputs/sft").resolve())
    record = json.loads((project / "outputs/dpo/base_model.json").read_text())
    assert record == {"project_path": "outputs/sft"}

    ids, _ = batch(tokenizer)
    expected = policy.eval()(ids).logits
    monkeypatch.chdir(tmp_path)
    shutil.copytree(project / "outputs/dpo", tmp_path / "elsewhere")
    plain = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "elsewhere")).eval()
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=0)
    # a checkout moved (or a worker's, at another path): its own outputs/sft, not the vanished one
    shutil.move(project, tmp_path / "moved")
    moved = load_causal_lm(tmp_path / "moved/outputs/dpo").eval()
    torch.testing.assert_close(moved(ids).logits, expected, atol=1e-5, rtol=0)


def test_a_merged_adapter_is_saved_in_the_dtype_its_base_stores(tokenizer, tmp_path):
    from safetensors import safe_open

    save_pretrained(tiny(tokenizer).to(torch.bfloat16), tokenizer, tmp_path / "base")
    policy = add_adapter(load_causal_lm(tmp_path / "base", dtype="float32"), LORA)  # trained in float32
    save_adapter(policy, tokenizer, tmp_path / "merged", merge=True)
    with safe_open(str(tmp_path / "merged/model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}


def test_reward_model_adapter_trains_its_head_and_loads_back(tokenizer, tmp_path):
    save_pretrained(tiny(tokenizer), tokenizer, tmp_path / "sft")
    model = load_sequence_classifier(tmp_path / "sft")
    model.config.reward_pooling = "mean"  # as the RM stage sets it: it must survive the adapter's save
    rm = add_adapter(model, LORA)
    before = {name: p.detach().clone() for name, p in rm.named_parameters()}
    ids, _ = batch(tokenizer)
    rm.train()
    optimizer = torch.optim.AdamW(rm.parameters(), lr=1e-2, weight_decay=0.1)
    (rm(input_ids=ids).logits[:, 0] * torch.tensor([1.0, -1.0])).sum().backward()
    optimizer.step()
    changed = {name for name, p in rm.named_parameters() if not torch.equal(p, before[name])}
    assert any("score" in name for name in changed)
    assert all("lora_" in name or "score.modules_to_save" in name for name in changed)
    rm.eval()
    inner = unwrap(rm)  # what reward.sequence_rewards reaches into: the body and the (trained) head
    scores = inner.score(inner.base_model(input_ids=ids).last_hidden_state)[:, -1]
    torch.testing.assert_close(scores, rm(input_ids=ids).logits)

    save_adapter(rm, tokenizer, tmp_path / "rm")
    loaded = load_sequence_classifier(tmp_path / "rm").eval()
    assert loaded.config.num_labels == 1 and loaded.config.reward_pooling == "mean"
    torch.testing.assert_close(loaded(input_ids=ids).logits, rm(input_ids=ids).logits, atol=1e-5, rtol=0)
    # a reward model from an SFT adapter output: its base with the adapter merged, and a fresh head
    policy = add_adapter(load_causal_lm(tmp_path / "sft"), LORA)
    save_adapter(policy, tokenizer, tmp_path / "sft_lora")
    assert load_sequence_classifier(tmp_path / "sft_lora").score.out_features == 1


def test_an_adapter_on_a_model_saved_nowhere_must_be_merged(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="saved nowhere"):
        save_adapter(add_adapter(tiny(tokenizer), LORA), tokenizer, tmp_path / "sft")
    save_adapter(add_adapter(tiny(tokenizer), LORA), tokenizer, tmp_path / "sft", merge=True)
    assert (tmp_path / "sft" / "model.safetensors").exists()


def test_registered_adapter_loads_back(tokenizer, tmp_path, monkeypatch):
    from alignment import tracking

    monkeypatch.chdir(tmp_path)  # the project root: the MLflow store and `outputs/sft`
    save_pretrained(tiny(tokenizer), tokenizer, tmp_path / "outputs/sft")
    policy = add_adapter(load_causal_lm("outputs/sft"), LORA)
    save_adapter(policy, tokenizer, tmp_path / "outputs/dpo")
    with tracking.mlflow_stage_run("dpo", root=tmp_path) as log:
        log.register_model(tmp_path / "outputs/dpo", "lora-test")
    # the base, logged as a model of its own (no registered version of it here), is named by its URI
    tags = tracking._mlflow(tmp_path).get_run(log.run_id).data.tags
    assert tags["lora_base_model"].startswith("models:/m-")
    local = tracking.load_registered_model("lora-test", version="1")
    ids, _ = batch(tokenizer)
    torch.testing.assert_close(
        load_causal_lm(local)(ids).logits, policy.eval()(ids).logits, atol=1e-5, rtol=0
    )


def invalid(section: str, raw: dict) -> str:
    with pytest.raises(ConfigError) as error:
        parse(section, raw, "some/params.yaml")
    return str(error.value)


@pytest.mark.parametrize(
    "section, raw, message",
    [
        ("sft", {"lora": {"r": 0}}, "sft.lora.r: Input should be greater than or equal to 1"),
        ("dpo", {"lora": {"dropout": 1.0}}, "dpo.lora.dropout: Input should be less than 1"),
        (
            "ppo",
            {"lora": {"target_modules": []}},
            "ppo.lora.target_modules: Value should have at least 1 item",
        ),
        ("grpo", {"lora": {"target_modules": "all"}}, "grpo.lora.target_modules.literal['all-linear']"),
        ("rest", {"lora": {"rank": 4}}, "rest.lora.rank: Extra inputs are not permitted"),
        ("brain", {"lora": {"alpha": "big"}}, "brain.lora.alpha: Input should be a valid integer"),
        ("sft", {"lora": {}}, "sft: Value error, lora without merge_on_save saves only the adapter"),
        (
            "rm",
            {"init_from": "model", "model": {"n_embd": 32, "n_head": 2}, "lora": {}},
            "rm: Value error, lora without merge_on_save",
        ),
    ],
)
def test_lora_config_rejects_bad_values_by_key(section, raw, message):
    assert message in invalid(section, raw)


def test_lora_config_is_optional_on_every_training_stage():
    for section in ("sft", "rm", "dpo", "brain", "ppo", "grpo", "rloo", "rest"):
        assert parse(section, {}).lora is None
    merged = parse("sft", {"lora": {"merge_on_save": True, "target_modules": ["c_attn"]}})
    assert merged.lora.target_modules == ("c_attn",)
    pretrained = {"model": {"init": "pretrained", "name_or_path": "outputs/base"}, "lora": {}}
    assert parse("sft", pretrained).lora.r == 16


@pytest.mark.parametrize(
    "model, message",
    [
        (
            {"dtype": "float64"},
            "sft.model.dtype: Input should be 'float32', 'bfloat16', 'float16' or",
        ),
        ({"torch_dtype": "bfloat16"}, "sft.model: Value error, torch_dtype is now dtype"),
        (
            {"attn_implementation": "flash"},
            "sft.model.attn_implementation: Input should be 'eager', 'sdpa' or",
        ),
        (
            {"revision": "main"},
            "sft.model: Value error, revision (of the hub's pretrained weights) needs init",
        ),
        pytest.param(
            {"attn_implementation": "flash_attention_2"},
            "sft.model.attn_implementation: Value error, flash_attention_2 needs the flash_attn package",
            marks=pytest.mark.skipif(find_spec("flash_attn") is not None, reason="flash_attn is installed"),
        ),
    ],
)
def test_model_load_options_reject_bad_values_by_key(model, message):
    assert message in invalid("sft", {"model": model})

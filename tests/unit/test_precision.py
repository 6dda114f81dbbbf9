"""A run's dtype (alignment/precision.py, `<stage>.compute`): every model a stage only runs is
loaded in it, what trains keeps float32 weights; `auto` is float32 on a CPU; the batch knobs validate;
PPO's LoRA critic shares the reward model's weights; DPO packs where the attention can."""

import pytest
import torch

from alignment import precision
from alignment.config import ConfigError, LoraConfig, ModelConfig, OptimizerConfig, PPOConfig
from alignment.models.loading import build_model, save_pretrained, train_tokenizer
from alignment.models.reward_model import RewardScorer, load_reward_model
from alignment.registry import parse

TEXTS = ["The film was a joy from start to finish.", "I hated every minute of it.", "Blue, like the sky."]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny SFT model and a reward model from it, saved as the stages save them."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=270, min_frequency=1)
    torch.manual_seed(0)
    sft = build_model(ModelConfig(n_layer=1, n_embd=16, n_head=2, max_position_embeddings=64), tokenizer)
    save_pretrained(sft, tokenizer, root / "sft")
    rm = load_reward_model(root / "sft")
    rm.config.pad_token_id = tokenizer.pad_token_id
    save_pretrained(rm, tokenizer, root / "rm")
    return root


def test_auto_is_float32_on_a_cpu_and_names_resolve():
    assert precision.resolve_dtype("auto") == torch.float32
    assert precision.resolve_dtype("bfloat16") == torch.bfloat16
    assert precision.training_precision(OptimizerConfig()) == "no"  # mixed_precision auto, on a CPU
    assert precision.training_precision(OptimizerConfig(mixed_precision="bf16")) == "bf16"
    a, b = torch.randn(2, 3), torch.randn(3, 2)
    with precision.autocast(torch.float32):
        assert (a @ b).dtype == torch.float32
    with precision.autocast(torch.bfloat16):  # a float32 model (one trained in full) runs in the dtype
        assert (a @ b).dtype == torch.bfloat16


@pytest.mark.parametrize("key", ["generation_batch_size", "scoring_batch_size"])
def test_batch_knobs_are_validated_naming_the_key(key):
    assert parse("dpo", {}).compute.model_dump() == {
        "dtype": "auto",
        "generation_batch_size": 256,
        "scoring_batch_size": 64,
    }
    with pytest.raises(
        ConfigError, match=rf"evaluate\.compute\.{key}: Input should be greater than or equal to 1"
    ):
        parse("evaluate", {"compute": {key: 0}})
    with pytest.raises(ConfigError, match=r"ppo\.compute\.dtype"):
        parse("ppo", {"compute": {"dtype": "float64"}})


def test_frozen_copies_load_in_the_run_dtype_and_trained_weights_stay_float32(saved):
    from alignment.stages.common import load_policy_and_reference

    _, policy, reference = load_policy_and_reference(saved / "sft", None, dtype=torch.bfloat16)
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    _, policy, reference = load_policy_and_reference(
        saved / "sft", LoraConfig(r=2, alpha=4), dtype=torch.bfloat16
    )
    trained = {p.dtype for p in policy.parameters() if p.requires_grad}
    frozen = {p.dtype for p in policy.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}


def test_a_bfloat16_reward_model_scores_close_to_the_float32_one(saved):
    prompts, responses = ["The film", "I hated"], [" was a joy.", " every minute."]
    full = RewardScorer(saved / "rm", batch_size=1)(prompts, responses, [True, False])
    low = RewardScorer(saved / "rm", dtype=torch.bfloat16)
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(low(prompts, responses, [True, False]), full, atol=0.05, rtol=0.05)


def test_a_lora_critic_is_the_reward_model_with_its_adapter_off(saved):
    """Its value head and adapter train; with the adapter off the same weights score as the saved RM,
    before and after the critic's weights move: one copy serves both."""
    from alignment.models.lora import AdapterDisabled
    from alignment.stages.ppo import build_critic

    cfg = PPOConfig(critic_lora=LoraConfig(r=2, alpha=4))
    critic = build_critic(cfg, None, saved / "rm", torch.float32)
    trained = [name for name, p in critic.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name or "score" in name for name in trained)
    shared = RewardScorer(saved / "rm", model=AdapterDisabled(critic))
    alone = RewardScorer(saved / "rm")
    prompts, responses, finished = ["The film", "Blue"], [" was a joy.", " sky."], [True, True]
    expected = alone(prompts, responses, finished)
    torch.testing.assert_close(shared(prompts, responses, finished), expected)
    with torch.no_grad():
        for name, p in critic.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    torch.testing.assert_close(shared(prompts, responses, finished), expected)
    with pytest.raises(ValueError, match="critic_lora: a LoRA critic needs a model of its own"):
        PPOConfig(critic_init="policy_head", critic_lora=LoraConfig())


def test_dpo_packs_where_the_attention_takes_a_mask(saved):
    from alignment.config import DPOConfig
    from alignment.models.loading import load_causal_lm
    from alignment.stages.dpo import packs

    model = load_causal_lm(saved / "sft")
    assert DPOConfig().padding_free == "auto"
    for implementation in ("sdpa", "eager"):
        model.config._attn_implementation = implementation
        assert packs(DPOConfig(), model) and not packs(DPOConfig(padding_free=False), model)
    model.config._attn_implementation = "flash_attention_2"
    assert not packs(DPOConfig(), model)
    with pytest.raises(ValueError, match="padding_free: true needs sdpa or eager attention"):
        packs(DPOConfig(padding_free=True), model)

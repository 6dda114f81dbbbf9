"""The one online-RL loop (alignment/training/online.py) that PPO, GRPO and RLOO share: what it promises
every method, on tiny models built in-process."""

import pytest
import torch

from alignment.config import ModelConfig
from alignment.models.loading import build_model, train_tokenizer
from alignment.training import online
from alignment.training.online_methods import GRPO, PPO, RLOO, group_settings, ppo_settings
from flows.config import parse

WORDS = ["good", "bad", "fine", "dull", "great", "poor", "nice", "odd"]
PROMPTS = [f"{w} {v}" for w in WORDS[:4] for v in WORDS[4:]]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = train_tokenizer([" ".join(WORDS)] * 20, vocab_size=300, min_frequency=1)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lm(tokenizer, dropout: float):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_embd=32, n_head=2, max_position_embeddings=32, dropout=dropout)
    return build_model(cfg, tokenizer)


def length_reward(prompts, texts, finished):
    return torch.tensor([len(text) / 10 for text in texts])


@pytest.mark.parametrize("name", ["grpo", "rloo", "ppo"])
def test_the_first_ratio_of_a_batch_is_one_even_with_dropout_in_the_model(tokenizer, name):
    """Old log-probs come from the sampling pass, new ones from the training pass: with dropout on in
    training the two differ and the very first ratio is not 1 (TRL turns dropout off in its online
    trainers; so does the loop). A clip range of 1e-4 catches any difference: nothing is clipped and the
    approximate KL of the first minibatch is 0."""
    policy, reference = lm(tokenizer, 0.5), lm(tokenizer, 0.0).eval()
    batch = {
        "max_new_tokens": 6,
        "max_length": 32,
        "train": {"checkpoint_every": None, "learning_rate": 1e-3},
    }
    if name == "ppo":
        cfg = parse(
            "ppo", batch | {"rollouts": 1, "rollout_batch_size": 8, "minibatch_size": 8, "ppo_epochs": 1}
        )
        cfg = cfg.model_copy(update={"clip_range": 1e-4})
        method, settings = PPO(cfg), ppo_settings(cfg)
        critic = __import__("alignment.stages.ppo", fromlist=["x"]).PolicyValueHead(policy)
    else:
        group = {"samples_per_prompt": 2, "prompts_per_batch": 4, "batches": 1, "minibatch_size": 8}
        cfg = parse(name, batch | group | {"epsilon": 1e-4, "beta": 0.04})
        method, settings, critic = {"grpo": GRPO, "rloo": RLOO}[name](cfg), group_settings(cfg), None
    history, _ = online.train(
        policy, reference, length_reward, tokenizer, PROMPTS, settings, method, None, "", critic=critic
    )
    clipped = history[0]["policy/clipfrac_avg"] if name == "ppo" else history[0]["clip_ratio/region_mean"]
    assert clipped == 0.0
    if name == "ppo":
        assert history[0]["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-10)
    assert all(m.p == 0.0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))


def test_the_gpu_knobs_reach_the_group_methods(tokenizer, monkeypatch):
    """GRPO and RLOO train through the loop's model preparation: gradient checkpointing is switched on
    for the policy (it was silently ignored by their old loop)."""
    seen = []
    policy = lm(tokenizer, 0.0)
    monkeypatch.setattr(
        type(policy),
        "gradient_checkpointing_enable",
        lambda self, **kwargs: seen.append(kwargs),
        raising=True,
    )
    cfg = parse(
        "grpo",
        {
            "max_new_tokens": 4,
            "samples_per_prompt": 2,
            "prompts_per_batch": 2,
            "batches": 1,
            "minibatch_size": 4,
            "train": {"checkpoint_every": None, "gradient_checkpointing": True},
        },
    )
    online.train(policy, None, length_reward, tokenizer, PROMPTS, group_settings(cfg), GRPO(cfg), None, "")
    assert seen == [{"gradient_checkpointing_kwargs": {"use_reentrant": False}}]


@pytest.mark.parametrize(
    "name, train, message",
    [
        ("grpo", {"mixed_precision": "fp16"}, "fp16 would need a loss scaler"),
        ("rloo", {"gradient_checkpointing_everywhere": True}, "Extra inputs are not permitted"),
        (
            "ppo",
            {"ppo_epochs": 2},
            "Extra inputs are not permitted",
        ),  # a PPO knob under train: not read there
    ],
)
def test_online_configs_refuse_what_the_loop_does_not_do(name, train, message):
    """Every knob of the online stages' `train` section reaches the shared loop or is refused: an unknown
    one, or fp16 (no loss scaler), fails validation naming the key."""
    from alignment.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse(name, {"train": train})

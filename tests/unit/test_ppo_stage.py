"""PPO end to end on tiny models: a bandit whose reward counts a target word, and the stage's exact resume."""

import shutil

import pytest
import torch

from alignment.config import ModelConfig
from alignment.models.loading import build_model, save_pretrained, train_tokenizer
from alignment.models.reward_model import load_reward_model
from alignment.paths import Paths
from alignment.stages import ppo
from alignment.training import online
from alignment.training.online_methods import PPO, ppo_settings
from flows.config import parse
from tests.conftest import MICRO_PARAMS

WORDS = ["good", "bad", "fine", "dull", "great", "poor", "nice", "odd"]


class Killed(Exception):
    pass


def test_ppo_raises_a_bandit_reward_with_bounded_kl(tmp_path):
    """The reward counts the word "great" in an 8-token response; SFT says it ~1/8 of the time.
    PPO must raise the count while the KL to the reference stays modest."""
    tokenizer = train_tokenizer([" ".join(WORDS)] * 20, vocab_size=300, min_frequency=1)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, max_position_embeddings=32), tokenizer)
    # a moment of SFT on random word sequences, so that samples are words and "great" is ~1 in 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        texts = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (14,))) for _ in range(32)]
        ids = torch.tensor([tokenizer(t).input_ids[:12] for t in texts])
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_pretrained(model, tokenizer, tmp_path / "lm")
    policy = type(model).from_pretrained(tmp_path / "lm")
    reference = type(model).from_pretrained(tmp_path / "lm").eval().requires_grad_(False)
    critic = load_reward_model(tmp_path / "lm")

    def reward(prompts, texts, finished):
        return torch.tensor([float(t.split().count("great")) for t in texts])

    cfg = parse(
        "ppo",
        {
            "max_new_tokens": 8,
            "max_length": 32,
            "rollouts": 16,
            "rollout_batch_size": 32,
            "minibatch_size": 8,
            "ppo_epochs": 4,
            "train": {"learning_rate": 3e-3, "critic_learning_rate": 3e-3, "checkpoint_every": None},
            "kl_coef": 0.05,
        },
    )
    prompts = [f"{w} {v}" for w in WORDS for v in WORDS]
    history, timing = online.train(
        policy, reference, reward, tokenizer, prompts, ppo_settings(cfg), PPO(cfg), None, "", critic=critic
    )
    first, last = history[0], history[-4:]
    late_score = sum(r["objective/scores"] for r in last) / len(last)
    late_kl = sum(r["objective/kl"] for r in last) / len(last)
    assert late_score > first["objective/scores"] + 1.0, (first["objective/scores"], late_score)
    assert 0 < late_kl < 30, late_kl  # moved away from the reference, but not without bound
    assert timing["generation_seconds"] > 0 and timing["training_seconds"] > 0
    for key in (
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "val/num_eos_tokens",
        "response_length",
        "kl_coef",
    ):
        assert key in first


def test_value_head_on_the_policy_trains_with_it(tmp_path):
    """critic_init policy_head: one transformer, the value loss reaches it; the head learns too."""
    tokenizer = train_tokenizer([" ".join(WORDS)] * 20, vocab_size=300, min_frequency=1)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    policy = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, max_position_embeddings=32), tokenizer)
    reference = build_model(
        ModelConfig(n_layer=1, n_embd=32, n_head=2, max_position_embeddings=32), tokenizer
    )
    reference.load_state_dict(policy.state_dict())
    critic = ppo.PolicyValueHead(policy)
    assert critic.base_model is policy.base_model

    def reward(prompts, texts, finished):
        return torch.tensor([float(len(t)) / 10 for t in texts])

    cfg = parse(
        "ppo",
        {
            "max_new_tokens": 4,
            "max_length": 32,
            "rollouts": 2,
            "rollout_batch_size": 8,
            "minibatch_size": 4,
            "ppo_epochs": 1,
            "critic_init": "policy_head",
            "train": {"checkpoint_every": None},
        },
    )
    history, _ = online.train(
        policy,
        reference.eval(),
        reward,
        tokenizer,
        WORDS,
        ppo_settings(cfg),
        PPO(cfg),
        None,
        "",
        critic=critic,
    )
    assert len(history) == 2 and critic.score.weight.abs().sum() > 0
    assert not torch.equal(
        policy.transformer.h[0].mlp.c_fc.weight, reference.transformer.h[0].mlp.c_fc.weight
    )


def run_ppo(root, monkeypatch, kill_after: int | None = None) -> dict:
    cfg = parse("ppo", MICRO_PARAMS["ppo"])
    if kill_after is not None:
        real_save = online.save_checkpoint

        def save_then_die(engine, path, fingerprint, done, *args):
            real_save(engine, path, fingerprint, done, *args)
            if done == kill_after:
                raise Killed

        monkeypatch.setattr(online, "save_checkpoint", save_then_die)
    monkeypatch.chdir(root)
    try:
        return ppo.run(cfg, Paths(root), None)
    finally:
        monkeypatch.undo()


def test_ppo_stage_resumes_exactly(upstream, monkeypatch):
    from safetensors.torch import load_file

    metrics = run_ppo(upstream, monkeypatch)
    assert metrics["batches"] == 4
    assert {
        "gold/reward",
        "gold/sft_reward",
        "rm/win_rate_vs_sft",
        "objective/kl",
        "generation_seconds",
    } <= set(metrics)
    uninterrupted = load_file(upstream / "outputs/ppo/model.safetensors")
    shutil.rmtree(upstream / "checkpoints/ppo")
    with pytest.raises(Killed):
        run_ppo(upstream, monkeypatch, kill_after=2)  # dies right after the checkpoint at rollout 2
    assert run_ppo(upstream, monkeypatch)["batches"] == 4
    for name, tensor in load_file(upstream / "outputs/ppo/model.safetensors").items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=0, atol=0, msg=name)

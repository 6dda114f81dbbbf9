"""GRPO and RLOO end to end on tiny models: a bandit through the stages' own training loop, samples that do
not depend on their batch, the reward choice, and each stage's exact resume after a kill."""

import shutil

import numpy as np
import pytest
import torch

from alignment.config import ModelConfig
from alignment.evaluation.gold_scorer import GoldScorer
from alignment.models.loading import build_model, save_pretrained, train_tokenizer
from alignment.paths import Paths
from alignment.stages import grpo, rloo
from alignment.stages.common import stage_reward
from alignment.training import online
from alignment.training.online_methods import GRPO, RLOO, group_settings
from flows.config import parse
from tests.conftest import MICRO_PARAMS

WORDS = ["good", "bad", "fine", "dull", "great", "poor", "nice", "odd"]
STAGES = {"grpo": grpo, "rloo": rloo}
METHODS = {"grpo": GRPO, "rloo": RLOO}


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def word_lm(tmp_path_factory):
    """A 1-layer GPT-2 that continues with random words from WORDS ("great" ~1 in 8), saved to a folder."""
    tokenizer = train_tokenizer([" ".join(WORDS)] * 20, vocab_size=300, min_frequency=1)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, max_position_embeddings=32), tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        texts = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (14,))) for _ in range(32)]
        ids = torch.tensor([tokenizer(t).input_ids[:12] for t in texts])
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("word_lm")
    save_pretrained(model, tokenizer, folder)
    return tokenizer, folder


def load(folder):
    from alignment.models.loading import load_causal_lm

    return load_causal_lm(folder), load_causal_lm(folder).eval().requires_grad_(False)


def count_great(prompts, texts, finished):
    return torch.tensor([float(t.split().count("great")) for t in texts])


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_bandit_the_rewarded_word_rises_through_the_training_loop(word_lm, name):
    """The reward counts "great" in an 8-token completion (~1 at the start); the stage's loop must raise it
    while the KL to the reference stays modest, logging TRL's metric names."""
    tokenizer, folder = word_lm
    policy, reference = load(folder)
    cfg = parse(
        name,
        {
            "max_new_tokens": 8,
            "max_length": 32,
            "samples_per_prompt": 4,
            "prompts_per_batch": 16,
            "batches": 8,
            "num_iterations": 2,
            "minibatch_size": 32,
            "beta": 0.04,
            "train": {"learning_rate": 3e-3, "checkpoint_every": None},
        },
    )
    prompts = [f"{w} {v}" for w in WORDS for v in WORDS]
    history, timing = online.train(
        policy, reference, count_great, tokenizer, prompts, group_settings(cfg), METHODS[name](cfg), None, ""
    )
    early = np.mean([r["reward"] for r in history[:2]])
    late = np.mean([r["reward"] for r in history[-3:]])
    assert late > early + 1.0, (early, late)
    assert 0 < np.mean([r["objective/kl"] for r in history[-3:]]) < 30
    assert timing["generation_seconds"] > 0 and timing["training_seconds"] > 0
    assert {
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "objective/kl",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/clipped_ratio",
        "entropy",
        "loss",
        "grad_norm",
    } <= set(history[0])


def test_a_sample_does_not_depend_on_its_batch(word_lm):
    """Sample i of a prompt in round r is drawn from its own seed: the same with other prompts around it,
    and another in the next round."""
    tokenizer, folder = word_lm
    policy, reference = load(folder)
    cfg = parse(
        "grpo", {"max_new_tokens": 6, "samples_per_prompt": 2, "prompts_per_batch": 2, "minibatch_size": 4}
    )
    settings = group_settings(cfg)

    def completions(prompts, batch_index):
        seed = online.batch_seed(cfg.train.seed, batch_index)
        data = online.make_rollout(policy, None, None, count_great, tokenizer, prompts, settings, seed)
        ids, labels = data.batch["input_ids"], data.batch["labels"]
        return [ids[row][labels[row] != -100].tolist() for row in range(len(prompts) * 2)]

    alone = completions(["good bad", "odd fine"], 0)
    assert completions(["nice dull", "good bad"], 0)[2:] == alone[:2]
    assert completions(["good bad", "odd fine"], 1)[:2] != alone[:2]


def test_reward_gold_scores_with_the_gold_scorer(upstream):
    paths = Paths(upstream)
    cfg = parse("grpo", MICRO_PARAMS["grpo"] | {"reward": "gold"})
    reward = stage_reward(cfg, paths, rm=None)
    prompts, responses = ["The film was", "I thought"], [" great, wonderful", " awful and dull"]
    expected = GoldScorer.load(paths.gold).reward([p + r for p, r in zip(prompts, responses)])
    np.testing.assert_allclose(reward(prompts, responses, [True] * len(prompts)), expected)
    assert parse("grpo", MICRO_PARAMS["grpo"]).reward == "rm"


def run_stage(name, root, monkeypatch, kill_after: int | None = None) -> dict:
    cfg = parse(name, MICRO_PARAMS[name])
    if kill_after is not None:
        real_save = online.save_checkpoint

        def save_then_die(engine, path, fingerprint, done, *args):
            real_save(engine, path, fingerprint, done, *args)
            if done == kill_after:
                raise Killed

        monkeypatch.setattr(online, "save_checkpoint", save_then_die)
    monkeypatch.chdir(root)
    try:
        return STAGES[name].run(cfg, Paths(root), None)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_stage_resumes_exactly_after_a_kill(upstream, monkeypatch, name):
    from safetensors.torch import load_file

    metrics = run_stage(name, upstream, monkeypatch)
    assert metrics["batches"] == 4
    assert {
        "gold/reward",
        "gold/win_rate_vs_sft",
        "rm/win_rate_vs_sft",
        "objective/kl",
        "train/reward",
        "train/kl",
        "generation_seconds",
    } <= set(metrics)
    assert (upstream / f"plots/{name}/train.csv").read_text().startswith("step,reward,")
    uninterrupted = load_file(upstream / f"outputs/{name}/model.safetensors")
    shutil.rmtree(upstream / f"checkpoints/{name}")
    with pytest.raises(Killed):
        run_stage(name, upstream, monkeypatch, kill_after=2)  # dies right after the checkpoint at batch 2
    assert run_stage(name, upstream, monkeypatch)["batches"] == 4
    for key, tensor in load_file(upstream / f"outputs/{name}/model.safetensors").items():
        torch.testing.assert_close(tensor, uninterrupted[key], rtol=0, atol=0, msg=key)

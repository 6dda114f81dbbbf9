"""Reward model and DPO on tiny models: the reward index, a separable pair set, DPO's step 0."""

import copy
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from alignment.config import ConfigError, DPOConfig, ModelConfig, TrainConfig
from alignment.data.batching import collate, encode
from alignment.data.preference_data import collate_pairs, count_pairs, encode_pair
from alignment.losses.logprobs import IGNORE_INDEX
from alignment.models.loading import build_model, save_pretrained, train_tokenizer
from alignment.models.reward_model import RewardScorer, load_reward_model, sequence_rewards
from alignment.paths import Paths
from alignment.stages import dpo, rm
from alignment.training.trainer import step_evaluation, train
from flows.config import parse
from tests.conftest import MICRO_PARAMS

GOOD = ["a wonderful film", "truly great acting", "I loved it", "superb and moving"]
BAD = ["a dreadful film", "truly awful acting", "I hated it", "boring and dull"]
PROMPTS = ["Review:", "My verdict:", "In short,", "Overall"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny GPT-2 whose pad token is EOS, the setting that breaks pad-id-based reward pooling."""
    tokenizer = train_tokenizer(
        [p + " " + t for p in PROMPTS for t in GOOD + BAD] * 3, vocab_size=300, min_frequency=1
    )
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, max_position_embeddings=32), tokenizer)
    model.config.pad_token_id = tokenizer.eos_token_id
    path = tmp_path_factory.mktemp("tiny")
    save_pretrained(model, tokenizer, path)
    return path, tokenizer


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(tiny_lm):
    path, tokenizer = tiny_lm
    model = load_reward_model(path).eval()
    texts = [(p, " " + t) for p, t in zip(PROMPTS, GOOD)]
    encoded = [encode(tokenizer, p, r, 32, finished=True) for p, r in texts]  # ends in EOS == pad
    alone = torch.stack(
        [
            sequence_rewards(
                model, torch.tensor([e["input_ids"]]), torch.ones(1, len(e["input_ids"]), dtype=torch.long)
            )
            for e in encoded
        ]
    ).squeeze(-1)
    right = collate(tokenizer.pad_token_id)(encoded)
    torch.testing.assert_close(sequence_rewards(model, right["input_ids"], right["attention_mask"]), alone)
    # left padding: same rewards (GPT-2 positions follow the mask only through position_ids)
    width = right["input_ids"].shape[1]
    left_ids = torch.full_like(right["input_ids"], tokenizer.pad_token_id)
    left_mask = torch.zeros_like(right["attention_mask"])
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        left_ids[row, width - n :], left_mask[row, width - n :] = torch.tensor(e["input_ids"]), 1
    position_ids = (left_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(
        input_ids=left_ids, attention_mask=left_mask, position_ids=position_ids
    ).last_hidden_state
    left_rewards = model.score(hidden).squeeze(-1)[:, -1]
    torch.testing.assert_close(left_rewards, alone, rtol=1e-4, atol=1e-5)
    # HF's own pooling, which finds the last token from pad_token_id == EOS, reads the wrong one
    hf = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits.squeeze(-1)
    assert not torch.allclose(hf, alone)


def test_mean_pooled_reward_is_the_mean_token_score_over_the_response(tiny_lm, tmp_path):
    path, tokenizer = tiny_lm
    model = load_reward_model(path).eval()
    model.config.reward_pooling = "mean"
    encoded = [encode(tokenizer, p, " " + t, 32, finished=True) for p, t in zip(PROMPTS, GOOD)]
    batch = collate(tokenizer.pad_token_id)(encoded)
    with torch.no_grad():
        got = sequence_rewards(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        for row, e in enumerate(encoded):  # by hand: one row alone, its response positions only
            hidden = model.base_model(input_ids=torch.tensor([e["input_ids"]])).last_hidden_state
            scores = model.score(hidden).squeeze()
            start = e["labels"].count(IGNORE_INDEX)
            assert start > 0 and e["input_ids"][-1] == tokenizer.eos_token_id
            assert got[row].item() == pytest.approx(scores[start:].mean().item(), abs=1e-5)
        with pytest.raises(ValueError, match="needs `labels`"):
            sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    # the mode travels with the saved model: a scorer loaded from disk pools the same way
    save_pretrained(model, tokenizer, tmp_path / "rm")
    scorer = RewardScorer(tmp_path / "rm", max_length=32)
    assert scorer.model.config.reward_pooling == "mean"
    scored = scorer(PROMPTS, [" " + t for t in GOOD], [True] * len(GOOD))
    torch.testing.assert_close(scored, got, rtol=1e-4, atol=1e-5)
    model.config.reward_pooling = "max"
    with pytest.raises(ValueError, match="reward_pooling 'max'"):
        sequence_rewards(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def test_reward_model_separates_a_separable_pair_set(tiny_lm):
    path, tokenizer = tiny_lm
    torch.manual_seed(0)
    model = load_reward_model(path)
    pairs = [
        {"prompt": p, "chosen": " " + g, "rejected": " " + b, "source": "toy"}
        for p in PROMPTS
        for g, b in zip(GOOD, BAD)
    ]
    examples = [encode_pair(tokenizer, pair, 32) for pair in pairs]
    pad = collate_pairs(tokenizer.pad_token_id)
    cfg = TrainConfig(
        batch_size=8, epochs=30, learning_rate=3e-3, warmup_steps=0, lr_schedule="constant", log_every=5
    )
    evaluate = rm.evaluation(pairs, examples, pad, 16, rm.RewardModelConfig())
    assert evaluate(model)["loss"] == pytest.approx(math.log(2), abs=0.05)  # a fresh head knows nothing
    result = train(model, examples, pad, rm.make_step(None, 0.0), count_pairs, cfg, evaluate=evaluate)
    final = result.eval_history[-1]
    assert final["accuracy"] == 1.0 and final["toy/accuracy"] == 1.0 and final["loss"] < 0.1


def test_dpo_starts_at_ln2_and_raises_the_margins(tiny_lm):
    path, tokenizer = tiny_lm
    from alignment.models.loading import load_causal_lm

    policy, reference = load_causal_lm(path), load_causal_lm(path).eval().requires_grad_(False)
    pairs = [
        {"prompt": p, "chosen": " " + g, "rejected": " " + b, "source": "toy"}
        for p in PROMPTS
        for g, b in zip(GOOD, BAD)
    ]
    examples = [encode_pair(tokenizer, pair, 32) for pair in pairs]
    pad = dpo.collate_with_reference(tokenizer.pad_token_id)
    dpo.precompute_reference(reference, examples, collate_pairs(tokenizer.pad_token_id), 8)
    cfg = DPOConfig(beta=0.5)
    step = dpo.make_step(reference, cfg)
    evaluate = step_evaluation(examples, pad, step, 16)
    at_start = evaluate(policy)
    assert at_start["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert at_start["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # on-the-fly reference log-probs give the same numbers as the precomputed ones
    fresh = [encode_pair(tokenizer, pair, 32) for pair in pairs]
    assert step_evaluation(fresh, pad, step, 16)(policy)["loss"] == pytest.approx(at_start["loss"], abs=1e-6)
    train(
        policy,
        examples,
        pad,
        step,
        count_pairs,
        TrainConfig(batch_size=8, epochs=10, learning_rate=3e-3, warmup_steps=0, lr_schedule="constant"),
    )
    after = evaluate(policy)
    assert after["rewards/margins"] > 1.0 and after["rewards/accuracies"] == 1.0 and after["loss"] < 0.4


class ConstantLM(torch.nn.Module):
    """A causal LM whose next-token distribution is `probs` at every position."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.log_probs = torch.nn.Parameter(torch.tensor(probs).log())

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.log_probs.expand(*input_ids.shape, -1))


@pytest.mark.parametrize("normalize, expected", [(True, 4.0), (False, 49.0)])
@pytest.mark.parametrize("precomputed", [True, False])
def test_ipo_step_averages_log_ratios_per_token(normalize, expected, precomputed):
    """dpo_loss's worked example through the stage: chosen "a a a a", rejected "b b" after the prompt
    token 0; log pi(a) = -1, log pi(b) = -4, log ref(a) = log ref(b) = -2 per token. Averaged:
    (-1, -2, -4, -2), loss (3 - 1)^2 = 4; summed: (-4, -8, -8, -4), loss (8 - 1)^2 = 49."""
    e = math.exp
    policy = ConstantLM([1 - e(-1) - e(-4), e(-1), e(-4)])
    reference = ConstantLM([1 - 2 * e(-2), e(-2), e(-2)])
    batch = {
        "input_ids": torch.tensor([[0, 1, 1, 1, 1], [0, 2, 2, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, 1, 1, 1, 1], [-100, 2, 2, -100, -100]]),
    }
    if precomputed:  # summed, as precompute_reference stores them
        batch["reference_logps"], reference = torch.tensor([-8.0, -4.0]), None
    cfg = DPOConfig(beta=0.5, loss_type="ipo", ipo_length_normalize=normalize)
    loss, metrics = dpo.make_step(reference, cfg)(policy, batch)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert metrics["logps/chosen"] == pytest.approx(-1.0 if normalize else -4.0, abs=1e-5)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "preferred_ft", "unlikelihood"])
def test_every_method_and_baseline_trains_toward_the_chosen(tiny_lm, loss_type):
    path, tokenizer = tiny_lm
    from alignment.models.loading import load_causal_lm

    policy, reference = load_causal_lm(path), load_causal_lm(path).eval().requires_grad_(False)
    pairs = [
        {"prompt": p, "chosen": " " + g, "rejected": " " + b, "source": "toy"}
        for p in PROMPTS
        for g, b in zip(GOOD, BAD)
    ]
    examples = [encode_pair(tokenizer, pair, 32) for pair in pairs]
    pad = dpo.collate_with_reference(tokenizer.pad_token_id)
    step = dpo.make_step(reference, DPOConfig(beta=0.5, loss_type=loss_type))
    train(
        policy,
        examples,
        pad,
        step,
        count_pairs,
        TrainConfig(batch_size=8, epochs=10, learning_rate=3e-3, warmup_steps=0, lr_schedule="constant"),
    )
    after = step_evaluation(examples, pad, step, 16)(policy)
    assert after["rewards/accuracies"] >= 0.75
    if loss_type == "ipo":  # IPO regresses beta * delta onto beta / (2 beta) = 0.5, not beyond
        assert after["rewards/margins"] == pytest.approx(0.5, abs=0.25)
    else:
        assert after["logps/chosen"] > after["logps/rejected"]


def test_min_gold_gap_drops_near_ties_from_training_only(tmp_path):
    from alignment.config import PreferenceData
    from alignment.data.io import write_jsonl
    from alignment.data.preference_data import load_pairs

    paths = Paths(tmp_path)
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "source": "imdb_pairs"}
        | {"chosen_gold": 1.0, "rejected_gold": 1.0 - gap}
        for gap in (0.05, 0.3, 1.2, 0.29)
    ]
    for split in ("train", "eval"):
        paths.pairs.mkdir(parents=True, exist_ok=True)
        write_jsonl(paths.pairs / f"{split}.jsonl", rows)
    data = PreferenceData(sources=("imdb_pairs",), min_gold_gap=0.3, max_train_pairs=1)
    kept = load_pairs(paths, data, "train")
    assert [r["rejected_gold"] for r in kept] == [pytest.approx(0.7)]  # 0.3 and 1.2 pass; the cap keeps one
    assert len(load_pairs(paths, data, "eval")) == 4  # eval keeps near ties: accuracy stays comparable
    assert len(load_pairs(paths, PreferenceData(sources=("imdb_pairs",)), "train")) == 4


def test_rm_of_its_own_a_fresh_mean_pooled_model_over_the_sft_tokenizer(upstream, tmp_path, monkeypatch):
    root = tmp_path / "project"
    shutil.copytree(upstream, root, symlinks=True)
    monkeypatch.chdir(root)
    params = copy.deepcopy(MICRO_PARAMS["rm"]) | {"register_as": None, "pooling": "mean"}
    with pytest.raises(ConfigError, match="init_from: model"):
        parse("rm", params | {"init_from": "model"})
    with pytest.raises(ConfigError, match="init_from: model"):
        parse("rm", params | {"model": {"n_layer": 1, "n_embd": 48, "n_head": 2}})
    model = {"n_layer": 3, "n_embd": 48, "n_head": 2, "max_position_embeddings": 64}
    cfg = parse("rm", params | {"init_from": "model", "model": model})
    metrics = rm.run(cfg, Paths(root), None)

    assert metrics["steps"] == 3 and 0.0 <= metrics["eval/accuracy"] <= 1.0
    config = json.loads((root / "outputs" / "rm" / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["reward_pooling"]) == (3, 48, "mean")
    sft = json.loads((root / "outputs" / "sft" / "config.json").read_text())
    assert sft["n_embd"] != 48 and config["vocab_size"] == sft["vocab_size"]  # its own body, SFT's tokens
    scorer = RewardScorer(root / "outputs" / "rm", max_length=64)
    scores = scorer(["A film", "A film"], [" good", " bad"], [True, False])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_packed_dpo_needs_the_transformers_that_takes_2d_logits_to_keep(monkeypatch):
    """dpo.padding_free slices logits with a 2-D `logits_to_keep`, which transformers takes from 5.24 on:
    an older one fails validation, naming the key and both versions, before any compute."""
    from alignment import config

    monkeypatch.setattr(config, "version", lambda package: "5.17.0")
    with pytest.raises(
        ConfigError, match=r"padding_free needs transformers >= 5\.24 .* 5\.17\.0 is installed"
    ):
        parse("dpo", {"padding_free": True})
    assert parse("dpo", {"padding_free": False}).padding_free is False
    monkeypatch.setattr(config, "version", lambda package: "5.24.1+cu128")
    assert parse("dpo", {"padding_free": True}).padding_free

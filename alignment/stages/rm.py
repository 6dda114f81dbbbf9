"""rm: a Bradley-Terry reward model, a scalar head on the SFT model (or on a fresh model of its own, or
any path), trained on gold-labelled IMDb pairs and human HH pairs; chosen and rejected are scored in one
forward pass."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from transformers import AutoModelForSequenceClassification

from alignment import precision
from alignment.config import RewardModelConfig
from alignment.data.preference_data import collate_pairs, count_pairs, encode_pair, load_pairs
from alignment.losses.preference_loss import bradley_terry_loss
from alignment.models.loading import check_max_length, load_tokenizer, model_config
from alignment.models.reward_model import load_reward_model, sequence_rewards
from alignment.paths import Paths
from alignment.plots import loss_curve
from alignment.stages.common import save_model
from alignment.stages.results import finish
from alignment.tracking import Tracker
from alignment.training.checkpoint import fingerprint as checkpoint_fingerprint
from alignment.training.trainer import train

logger = logging.getLogger(__name__)


def make_step(margin: float | None, center_coefficient: float):
    def step(model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        half = rewards.shape[0] // 2
        losses, _ = bradley_terry_loss(rewards[:half], rewards[half:], margin, center_coefficient)
        # the same statistics as evaluation, per training batch (the loop averages them per logged window)
        return losses.sum(), reward_stats(rewards[:half].detach(), rewards[half:].detach())

    return step


def reward_stats(chosen: torch.Tensor, rejected: torch.Tensor, prefix: str = "") -> dict[str, float]:
    both = torch.cat([chosen, rejected])
    return {
        f"{prefix}accuracy": ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item(),
        f"{prefix}margin": (chosen - rejected).mean().item(),
        f"{prefix}reward_mean": both.mean().item(),
        f"{prefix}reward_std": both.std().item() if both.numel() > 1 else 0.0,
        f"{prefix}reward_min": both.min().item(),
        f"{prefix}reward_max": both.max().item(),
    }


def evaluation(pairs: list[dict], examples: list[dict], pad, batch_size: int, cfg: RewardModelConfig):
    """BT loss over all eval pairs, and accuracy / margin / reward statistics overall and per source."""

    def evaluate(model) -> dict[str, float]:
        device = next(model.parameters()).device
        chosen, rejected = [], []
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in pad(examples[start : start + batch_size]).items()}
            rewards = sequence_rewards(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            ).cpu()
            half = rewards.shape[0] // 2
            chosen.append(rewards[:half])
            rejected.append(rewards[half:])
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        losses, _ = bradley_terry_loss(chosen, rejected, cfg.margin, cfg.center_coefficient)
        metrics = {"loss": losses.mean().item(), **reward_stats(chosen, rejected)}
        by_source = defaultdict(list)
        for i, pair in enumerate(pairs):
            by_source[pair["source"]].append(i)
        for source, rows in sorted(by_source.items()):
            metrics |= reward_stats(chosen[rows], rejected[rows], prefix=f"{source}/")
        return metrics

    return evaluate


def run(cfg: RewardModelConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    init = paths.sft if cfg.init_from in ("sft", "model") else cfg.init_from
    tokenizer = load_tokenizer(init)
    torch.manual_seed(cfg.train.seed)  # the fresh scalar head (and body, for init_from: model)
    if cfg.init_from == "model":
        config = model_config(cfg.model, tokenizer)
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
        init = f"a fresh {cfg.model.arch} ({cfg.model.n_layer} x {cfg.model.n_embd})"
    else:  # trained in full: float32 weights; under LoRA the frozen body in the run's dtype
        dtype = precision.resolve_dtype(cfg.compute.dtype) if cfg.lora is not None else torch.float32
        model = load_reward_model(init, dtype=dtype)
    if cfg.lora is not None:  # the body frozen under an adapter; the fresh head trains in full
        from alignment.models.lora import add_adapter

        model = add_adapter(model, cfg.lora, cfg.train.seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.reward_pooling = cfg.pooling  # saved with the model: every scorer pools the same way
    check_max_length(cfg.max_length, model, "rm.max_length")
    train_pairs, eval_pairs = load_pairs(paths, cfg.data, "train"), load_pairs(paths, cfg.data, "eval")
    logger.info("reward model from %s: %d train / %d eval pairs", init, len(train_pairs), len(eval_pairs))
    train_examples = [encode_pair(tokenizer, p, cfg.max_length) for p in train_pairs]
    eval_examples = [encode_pair(tokenizer, p, cfg.max_length) for p in eval_pairs]
    pad = collate_pairs(tokenizer.pad_token_id)
    result = train(
        model,
        train_examples,
        pad,
        make_step(cfg.margin, cfg.center_coefficient),
        count_pairs,
        cfg.train,
        checkpoint_dir=paths.checkpoints("rm"),
        fingerprint=checkpoint_fingerprint("rm", cfg, paths.root),
        evaluate=evaluation(eval_pairs, eval_examples, pad, cfg.train.batch_size, cfg),
        log_metrics=log.metrics if log else None,
    )
    save_model(model, tokenizer, paths.rm, cfg.lora)

    final = result.eval_history[-1]
    metrics = {f"eval/{k}": v for k, v in final.items() if k != "step"}
    metrics |= {
        "train/loss": result.history[-1]["loss"],
        "train/accuracy": result.history[-1]["accuracy"],
        "steps": result.steps,
    }
    logger.info(
        "eval accuracy %.3f %s",
        final["accuracy"],
        {k: round(v, 3) for k, v in final.items() if k.endswith("/accuracy")},
    )
    columns = ["step", "loss", "accuracy", "margin"]
    figure = loss_curve(result.history, result.eval_history, "Reward model loss", ylabel="Bradley-Terry loss")
    return finish(
        "rm",
        paths,
        log,
        metrics,
        csvs={"train.csv": (result.history, columns), "eval.csv": (result.eval_history, columns)},
        figures={"plots/rm_loss.png": figure},
        model=paths.rm,
        register_as=cfg.register_as,
        kind="reward",
        scoring={"max_length": cfg.max_length},  # what it was trained at (also the run's max_length param)
    )

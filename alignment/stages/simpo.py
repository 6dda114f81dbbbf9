"""simpo: SimPO (Meng et al. 2024) from the SFT policy on the preference pairs DPO trains on, with no
reference model: the implicit reward is beta times a response's average log-prob per token, and the
chosen response must win by the margin gamma (`simpo_loss`). After training, policy and SFT continue the
same held-out IMDb prompts and the gold scorer and the RM judge both.

  1. The policy (and the frozen SFT model, for the held-out comparison only); the pairs, encoded.
  2. The shared trainer with SimPO's step: one forward over chosen and rejected rows, per-token
     log-probs averaged per response, the loss.
  3. The policy saved and compared with SFT on held-out prompts; metrics, the training curve, the model
     registered as `alignment-simpo`.
"""

from __future__ import annotations

import logging

import torch

from alignment.config import SimPOConfig
from alignment.data.preference_data import collate_pairs, count_pairs, encode_pair, load_pairs
from alignment.losses.logprobs import token_logps
from alignment.losses.preference_loss import simpo_loss
from alignment.models.loading import check_max_length
from alignment.paths import Paths
from alignment.plots import loss_curve
from alignment.stages.common import (
    compare_on_held_out,
    load_policy_and_reference,
    log_held_out,
    reward_scorer,
    run_dtype,
    save_model,
)
from alignment.stages.results import finish
from alignment.tracking import Tracker
from alignment.training.checkpoint import fingerprint
from alignment.training.trainer import step_evaluation, train

logger = logging.getLogger(__name__)


def make_step(cfg: SimPOConfig):
    def step(model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tokens, mask = token_logps(logits, batch["labels"])
        average_logps = tokens.sum(-1) / mask.sum(-1).clamp(min=1)
        half = average_logps.shape[0] // 2
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            average_logps[:half], average_logps[half:], cfg.beta, cfg.gamma, cfg.label_smoothing
        )
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": average_logps[:half].detach().mean(),  # per token, as SimPO's reward reads them
            "logps/rejected": average_logps[half:].detach().mean(),
        }
        values = torch.stack(list(metrics.values())).tolist()  # one host sync for all six
        return losses.sum(), dict(zip(metrics, values))

    return step


def run(cfg: SimPOConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    # step 1. the policy, SFT for the held-out comparison, the pairs
    tokenizer, policy, reference = load_policy_and_reference(
        paths.sft, cfg.lora, cfg.train.seed, run_dtype(cfg)
    )
    check_max_length(cfg.max_length, policy, "simpo.max_length")
    train_pairs, eval_pairs = load_pairs(paths, cfg.data, "train"), load_pairs(paths, cfg.data, "eval")
    train_examples = [encode_pair(tokenizer, p, cfg.max_length) for p in train_pairs]
    eval_examples = [encode_pair(tokenizer, p, cfg.max_length) for p in eval_pairs]
    pad = collate_pairs(tokenizer.pad_token_id)
    logger.info(
        "SimPO (beta %g, gamma %g): %d train / %d eval pairs",
        cfg.beta,
        cfg.gamma,
        len(train_pairs),
        len(eval_pairs),
    )

    # step 2. the shared trainer with SimPO's step
    step = make_step(cfg)
    result = train(
        policy,
        train_examples,
        pad,
        step,
        count_pairs,
        cfg.train,
        checkpoint_dir=paths.checkpoints("simpo"),
        fingerprint=fingerprint("simpo", cfg, paths.root),
        evaluate=step_evaluation(eval_examples, pad, step, cfg.train.batch_size),
        log_metrics=log.metrics if log else None,
    )

    # step 3. save, compare with SFT on held-out prompts, report
    out = paths.out("simpo")
    save_model(policy, tokenizer, out, cfg.lora)
    reward = reward_scorer(paths, "rm", cfg.max_length, cfg.compute)
    held_out, rows = compare_on_held_out(
        policy, reference, tokenizer, paths, cfg, reward, cfg.train.seed, out=out
    )
    log_held_out("SimPO", held_out)
    final = result.eval_history[-1]
    metrics = {f"eval/{k}": v for k, v in final.items() if k != "step"} | held_out
    metrics |= {"train/loss": result.history[-1]["loss"], "steps": result.steps}
    figure = loss_curve(result.history, result.eval_history, "SimPO loss", ylabel="loss per pair")
    return finish(
        "simpo",
        paths,
        log,
        metrics,
        csvs={"train.csv": (result.history, ["step", "loss", "rewards/margins", "rewards/accuracies"])},
        curves=(held_out, result.steps),
        figures={"plots/simpo_loss.png": figure},
        tables={"held_out_generations.json": rows[: cfg.samples.num_prompts]},
        model=out,
        register_as=cfg.register_as,
    )

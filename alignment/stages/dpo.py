"""dpo: Direct Preference Optimization (Rafailov et al. 2023) from the SFT policy, with the SFT model as
the frozen reference; IPO (on per-token log-ratios unless `ipo_length_normalize` is false), hinge and
conservative DPO through `loss_type` and `label_smoothing`, and the DPO paper's two baselines on the
same pairs: `preferred_ft` (fine-tune on the chosen responses) and `unlikelihood` (Welleck et al. 2019).
After training, policy and SFT continue the same held-out IMDb prompts and the gold scorer judges both."""

from __future__ import annotations

import logging

import torch

from alignment.config import DPOConfig
from alignment.losses import dpo_loss, sequence_logps, token_logps, unlikelihood_loss
from alignment.models import check_max_length
from alignment.paths import Paths
from alignment.plots import loss_curve
from alignment.preference import collate_pairs, count_pairs, encode_pair, load_pairs
from alignment.registry import fingerprint as registry_fingerprint
from alignment.results import finish
from alignment.stage_helpers import (
    compare_on_held_out,
    load_policy_and_reference,
    log_held_out,
    reward_scorer,
    save_model,
)
from alignment.tracking import Tracker
from alignment.trainer import train

logger = logging.getLogger(__name__)


def policy_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) summed response log-probs of the stacked chosen and rejected rows."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"])


@torch.no_grad()
def precompute_reference(reference, examples: list[dict], pad, batch_size: int) -> None:
    """Reference log-probs once, before training: the reference never changes, so every later epoch
    and step reads them from the example instead of running a second model."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        logps = policy_logps(reference, pad(chunk))
        for i, example in enumerate(chunk):
            example["reference_logps"] = (logps[i].item(), logps[len(chunk) + i].item())


def collate_with_reference(pad_token_id: int):
    pad = collate_pairs(pad_token_id)

    def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad(examples)
        if all("reference_logps" in e for e in examples):
            chosen, rejected = zip(*(e["reference_logps"] for e in examples))
            batch["reference_logps"] = torch.tensor(chosen + rejected)
        return batch

    return collate_fn


def make_step(reference, cfg: DPOConfig):
    def step(model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tokens, mask = token_logps(logits, batch["labels"])
        logps = tokens.sum(-1)
        if "reference_logps" in batch:
            reference_logps = batch["reference_logps"]
        else:
            with torch.no_grad():
                reference_logps = policy_logps(reference, batch)
        if cfg.loss_type == "ipo" and cfg.ipo_length_normalize:
            # per-token averages, the IPO paper's form (see DPOConfig): one target margin for short and
            # long answers. The counts come from this batch's labels, the very tokens the reference
            # log-probs (precomputed or not) were summed over; rewards and logps/* are then per token.
            num_tokens = mask.sum(-1)
            logps, reference_logps = logps / num_tokens, reference_logps / num_tokens
        half = logps.shape[0] // 2
        # the implicit rewards beta * log(pi / ref) are reported for every method, baselines included
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:half],
            logps[half:],
            reference_logps[:half],
            reference_logps[half:],
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            loss_type=cfg.loss_type if cfg.loss_type in ("sigmoid", "ipo", "hinge") else "sigmoid",
        )
        if cfg.loss_type == "preferred_ft":
            losses = -logps[:half]
        elif cfg.loss_type == "unlikelihood":
            losses = unlikelihood_loss(logps[:half], tokens[half:], mask[half:], cfg.unlikelihood_alpha)
        metrics = {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": logps[:half].mean().item(),
            "logps/rejected": logps[half:].mean().item(),
        }
        return losses.sum(), metrics

    return step


def evaluation(examples: list[dict], pad, step, batch_size: int):
    def evaluate(model) -> dict[str, float]:
        device = next(model.parameters()).device
        totals, n = {}, 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            loss_sum, metrics = step(model, {k: v.to(device) for k, v in pad(chunk).items()})
            for key, value in {"loss": loss_sum.item() / len(chunk), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value * len(chunk)
            n += len(chunk)
        return {key: value / n for key, value in totals.items()}

    return evaluate


def run(cfg: DPOConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    tokenizer, policy, reference = load_policy_and_reference(paths.sft, cfg.lora)
    check_max_length(cfg.max_length, policy, "dpo.max_length")
    train_pairs, eval_pairs = load_pairs(paths, cfg.data, "train"), load_pairs(paths, cfg.data, "eval")
    train_examples = [encode_pair(tokenizer, p, cfg.max_length) for p in train_pairs]
    eval_examples = [encode_pair(tokenizer, p, cfg.max_length) for p in eval_pairs]
    pad = collate_with_reference(tokenizer.pad_token_id)
    if cfg.precompute_reference:
        precompute_reference(
            reference, train_examples + eval_examples, collate_pairs(tokenizer.pad_token_id), 64
        )
    step = make_step(reference, cfg)
    logger.info(
        "DPO (%s, beta %g): %d train / %d eval pairs",
        cfg.loss_type,
        cfg.beta,
        len(train_pairs),
        len(eval_pairs),
    )

    result = train(
        policy,
        train_examples,
        pad,
        step,
        count_pairs,
        cfg.train,
        checkpoint_dir=paths.checkpoints("dpo"),
        fingerprint=registry_fingerprint("dpo", cfg, paths.root),
        evaluate=evaluation(eval_examples, pad, step, cfg.train.batch_size),
        log_metrics=log.metrics if log else None,
    )
    out = paths.out("dpo")
    save_model(policy, tokenizer, out, cfg.lora)

    reward = reward_scorer(paths, "rm", cfg.max_length)
    held_out, rows = compare_on_held_out(
        policy, reference, tokenizer, paths, cfg, reward, cfg.train.seed, out=out
    )
    log_held_out("DPO", held_out)
    final = result.eval_history[-1]
    metrics = {f"val/{k}": v for k, v in final.items() if k != "step"} | held_out
    metrics |= {"train/loss": result.history[-1]["loss"], "steps": result.steps}
    figure = loss_curve(
        result.history, result.eval_history, f"DPO ({cfg.loss_type}) loss", ylabel="loss per pair"
    )
    return finish(
        "dpo",
        paths,
        log,
        metrics,
        csvs={"train.csv": (result.history, ["step", "loss", "rewards/margins", "rewards/accuracies"])},
        curves=(held_out, result.steps),
        figures={"plots/dpo_loss.png": figure},
        tables={"held_out_generations.json": rows[: cfg.samples.num_prompts]},
        model=out,
        register_as=cfg.register_as,
    )

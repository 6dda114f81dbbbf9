"""dpo: Direct Preference Optimization (Rafailov et al. 2023) from the SFT policy, with the SFT model as
the frozen reference; IPO (on per-token log-ratios unless `ipo_length_normalize` is false), hinge and
conservative DPO through `loss_type` and `label_smoothing`, and the DPO paper's two baselines on the
same pairs: `preferred_ft` (fine-tune on the chosen responses) and `unlikelihood` (Welleck et al. 2019).
After training, policy and SFT continue the same held-out IMDb prompts and the gold scorer judges both."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from alignment import precision
from alignment.config import PACKED_LOGITS_TRANSFORMERS, DPOConfig, _version
from alignment.data import packing
from alignment.data.preference_data import collate_pairs, count_pairs, encode_pair, load_pairs
from alignment.losses.logprobs import sequence_logps, token_logps
from alignment.losses.preference_loss import dpo_loss, unlikelihood_loss
from alignment.models import scoring
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
from alignment.training import distributed, sharding
from alignment.training.checkpoint import fingerprint as checkpoint_fingerprint
from alignment.training.trainer import step_evaluation, train

logger = logging.getLogger(__name__)


def summed_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) summed response log-probs of the stacked chosen and rejected rows."""
    if "logit_positions" in batch:
        return response_token_logps(model, batch)[0].sum(-1)
    if not torch.is_grad_enabled():  # the reference: logits at response positions only, the same sums
        return scoring.response_token_logps(model, batch).sum(-1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"])


def response_token_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, T) per-token response log-probs and their float mask, chosen rows then rejected, from a padded
    batch or a padding-free one (alignment/data/packing.py; there T = R * K, most entries 0)."""
    if "logit_positions" not in batch:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_logps(logits, batch["labels"])
    mask = packing.attention_mask(batch["group"], batch["branch"])
    implementation = getattr(model, "module", model).config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"dpo.padding_free needs sdpa or eager attention (a mask), not {implementation}")
    if implementation == "eager":  # eager adds its mask to the scores
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    # logits only where a response token is predicted: the LM head and log-softmax skip the prompt
    logits = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=mask,
        logits_to_keep=batch["logit_positions"],
    ).logits
    tokens = packing.token_logps(logits, batch["targets"], batch["target_mask"])
    num_sequences = batch["sequence_lengths"].shape[0]
    return packing.per_sequence(tokens, batch["target_sequence"], batch["target_mask"], num_sequences)


@torch.no_grad()
def precompute_reference(reference, examples: list[dict], pad, batch_size: int) -> None:
    """Reference log-probs once, before training: the reference never changes, so every later epoch
    and step reads them from the example instead of running a second model. `batch_size` pairs per
    forward, collated by `pad` (the training batches' layout, so that a policy equal to the reference
    gets exactly its log-probs). Several processes each compute a block of the examples and all gather."""

    def logps_of(block: list[dict]) -> list[tuple[float, float]]:
        out = []
        starts = range(0, len(block), batch_size)
        bar = tqdm(
            starts, desc="reference", unit="batch", disable=len(starts) <= 1 or not distributed.is_main()
        )
        for start in bar:
            chunk = block[start : start + batch_size]
            batch = {k: v.to(distributed.device()) for k, v in pad(chunk).items()}
            logps = summed_logps(reference, batch).cpu()
            out += [(logps[i].item(), logps[len(chunk) + i].item()) for i in range(len(chunk))]
        return out

    for example, logps in zip(examples, distributed.map_sharded(logps_of, examples)):
        example["reference_logps"] = logps


def packs(cfg: DPOConfig, model) -> bool:
    """Whether the run packs its pairs: `padding_free` true, or `auto` where the model's attention takes
    the block mask of a packed batch (sdpa, eager) and transformers slices logits by a 2-D
    `logits_to_keep`; flash_attention_2 (no arbitrary mask) and older transformers pad."""
    implementation = scoring.inner_model(model).config._attn_implementation
    if cfg.padding_free is True and implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"dpo.padding_free: true needs sdpa or eager attention, the model has {implementation}"
        )
    if cfg.padding_free != "auto":
        return cfg.padding_free
    return implementation in ("sdpa", "eager") and _version("transformers") >= PACKED_LOGITS_TRANSFORMERS


def collate_with_reference(pad_token_id: int, padding_free: bool = False, capacity: int = 512):
    """Pairs as one batch: padded (chosen rows then rejected), or with `padding_free` packed into rows of
    about `capacity` tokens, each pair's shared prompt once (alignment/data/packing.py)."""
    pad = collate_pairs(pad_token_id)

    def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
        if padding_free:
            rows = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
            batch = packing.pack(rows, capacity, pairs=[(i, len(examples) + i) for i in range(len(examples))])
        else:
            batch = pad(examples)
        if all("reference_logps" in e for e in examples):
            chosen, rejected = zip(*(e["reference_logps"] for e in examples))
            batch["reference_logps"] = torch.tensor(chosen + rejected)
        return batch

    return collate_fn


def pairs_in(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The pairs of a padded or padding-free batch (count_pairs reads the padded row count)."""
    if "sequence_lengths" in batch:
        return torch.tensor(batch["sequence_lengths"].shape[0] // 2)
    return count_pairs(batch)


def make_step(reference, cfg: DPOConfig):
    def step(model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, mask = response_token_logps(model, batch)
        logps = tokens.sum(-1)
        if "reference_logps" in batch:
            reference_logps = batch["reference_logps"]
        else:
            with torch.no_grad():
                reference_logps = summed_logps(reference, batch)
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
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": logps[:half].detach().mean(),
            "logps/rejected": logps[half:].detach().mean(),
        }
        # one host sync for all six, not one each
        values = torch.stack(list(metrics.values())).tolist()
        return losses.sum(), dict(zip(metrics, values))

    return step


def run(cfg: DPOConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    tokenizer, policy, reference = load_policy_and_reference(
        paths.sft, cfg.lora, cfg.train.seed, run_dtype(cfg)
    )
    check_max_length(cfg.max_length, policy, "dpo.max_length")
    train_pairs, eval_pairs = load_pairs(paths, cfg.data, "train"), load_pairs(paths, cfg.data, "eval")
    train_examples = [encode_pair(tokenizer, p, cfg.max_length) for p in train_pairs]
    eval_examples = [encode_pair(tokenizer, p, cfg.max_length) for p in eval_pairs]
    packed = packs(cfg, policy)
    pad = collate_with_reference(tokenizer.pad_token_id, packed)
    if cfg.precompute_reference:
        # whole on every process (FSDP2): each scores its own block, scoring_batch_size pairs at once
        with sharding.gathered(reference), precision.autocast(run_dtype(cfg)):
            precompute_reference(
                reference, train_examples + eval_examples, pad, cfg.compute.scoring_batch_size
            )
    step = make_step(reference, cfg)
    logger.info(
        "DPO (%s, beta %g, %s): %d train / %d eval pairs",
        cfg.loss_type,
        cfg.beta,
        "packed" if packed else "padded",
        len(train_pairs),
        len(eval_pairs),
    )

    result = train(
        policy,
        train_examples,
        pad,
        step,
        pairs_in,
        cfg.train,
        checkpoint_dir=paths.checkpoints("dpo"),
        fingerprint=checkpoint_fingerprint("dpo", cfg, paths.root),
        evaluate=step_evaluation(eval_examples, pad, step, cfg.train.batch_size),
        log_metrics=log.metrics if log else None,
    )
    out = paths.out("dpo")
    save_model(policy, tokenizer, out, cfg.lora)

    reward = reward_scorer(paths, "rm", cfg.max_length, cfg.compute)
    held_out, rows = compare_on_held_out(
        policy, reference, tokenizer, paths, cfg, reward, cfg.train.seed, out=out
    )
    log_held_out("DPO", held_out)
    final = result.eval_history[-1]
    metrics = {f"eval/{k}": v for k, v in final.items() if k != "step"} | held_out
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

"""rest_iter: one ReST iteration (Gulcehre et al. 2023), a DVC stage of its own (`rest_iter@<k>`),
from the policy `rest.iterations[k]` names (iteration k - 1's, or for the first the SFT model or the
champion). Everything it makes is an output of its folder `outputs/rest/<k>/`:
`grown.jsonl` (every sample and its reward: the RM's, or with `reward: code` the functions' sum),
`kept.jsonl` (what each Improve step trained on, with its tau), `policy/`, and `report.json` (the
held-out record of every iteration so far).

  1. The guard first: if an earlier iteration stopped the run, this one does not train; its policy
     is its start policy unchanged and its report says why.
  2. The first iteration scores its start policy on the held-out prompts: iteration 0 of the record,
     what every later iteration (and the scheduled retraining's champion check) is compared with.
  3. Grow: N samples per prompt from the start policy (the prepared training prompts plus any new
     ones in `rest.incoming`), each prompt with its own seed; the RM (or `rewards`) scores every sample.
  4. Improve, step i = 0, 1, ...: tau_i from the grown rewards (rising with i); NLL on the samples
     strictly above tau_i (optionally mixed with SFT rows), continuing from step i - 1's weights; the
     learning rate of iteration k is lr * lr_decay ** (k - 1).
  5. Policy vs SFT on held-out prompts (the eval split: the leaderboard's test prompts stay unseen),
     judged by the gold scorer (the held-out judge) and the RM (the proxy); then the guard.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from alignment import precision
from alignment.config import RestConfig
from alignment.data.batching import collate, encode, fit
from alignment.data.chat import render_prompt, render_row
from alignment.data.io import read_jsonl, write_jsonl, write_metrics
from alignment.data.prompts import load_incoming, load_prompts
from alignment.evaluation.heldout import compare_to_sft
from alignment.models.generation import decode_responses, generate_ids, prompt_seed
from alignment.models.loading import check_max_length, load_causal_lm, load_tokenizer
from alignment.paths import Paths
from alignment.rewards.source import RewardSource
from alignment.stages.common import (
    held_out_judges,
    held_out_summary,
    reward_scorer,
    save_model,
    score_samples,
    stage_reward,
)
from alignment.tracking import Tracker
from alignment.training import distributed, sharding
from alignment.training.rest_rules import above, guard, learning_rate, thresholds
from alignment.training.trainer import count_response_tokens, nll_step, train

logger = logging.getLogger(__name__)


def previous_report(paths: Paths, iteration: int) -> dict:
    if iteration == 1:
        return {"history": [], "stopped": None}
    path = paths.rest(iteration - 1) / "report.json"
    return json.loads(path.read_text())


def grow_prompts(cfg: RestConfig, paths: Paths, tokenizer) -> tuple[list[str], dict[str, float]]:
    """The training prompts and the new ones from the incoming folder (counted, with what was skipped)."""
    prompts = load_prompts(paths, "train", cfg.source, cfg.train_prompts, tokenizer)
    stats: dict[str, float] = {"grow/prompts_prepared": len(prompts), "grow/prompts_incoming": 0}
    if cfg.incoming:
        incoming, skipped = load_incoming(paths.resolve(cfg.incoming))
        incoming = [render_prompt(tokenizer, p) for p in incoming]
        known = set(prompts)
        new = [p for p in incoming if p not in known]
        stats["grow/prompts_incoming"] = len(new)
        stats |= {f"grow/incoming_skipped/{reason}": n for reason, n in skipped.items()}
        if incoming:
            logger.info(
                "incoming prompts: %d new from %s (skipped: %s)", len(new), cfg.incoming, skipped or "none"
            )
        prompts = prompts + new
    return prompts, stats


def grow(policy, tokenizer, reward, prompts: list[str], cfg: RestConfig, iteration: int) -> list[dict]:
    """N samples per prompt, each (prompt, sample index) with its own seed, scored by `reward` (the RM, or
    a reward computed by code)."""
    g = cfg.grow
    repeated = [p for p in prompts for _ in range(g.samples_per_prompt)]
    indices = [j for _ in prompts for j in range(g.samples_per_prompt)]
    seeds = [prompt_seed(cfg.seed * 1_000 + iteration, p, j) for p, j in zip(repeated, indices)]

    def draw_and_score(rows: list[int]) -> list:  # several processes: each its block, then all gather
        picked = [repeated[i] for i in rows]
        with precision.autocast(precision.resolve_dtype(cfg.compute.dtype)):
            drawn = generate_ids(
                policy,
                tokenizer,
                picked,
                g.max_new_tokens,
                g.temperature,
                g.top_p,
                cfg.compute.generation_batch_size,
                seeds=[seeds[i] for i in rows],
            )
        scores = score_samples(reward, picked, drawn, tokenizer, policy)
        return list(zip(drawn, decode_responses(tokenizer, drawn), scores))

    sampled, responses, rewards = zip(*distributed.map_sharded(draw_and_score, list(range(len(repeated)))))
    return [
        {
            "prompt": p,
            "index": j,
            "response": text,
            "reward": r,
            "prompt_ids": ids,
            "response_ids": response_ids,
        }
        for p, j, text, r, (ids, response_ids) in zip(repeated, indices, responses, rewards, sampled)
    ]


def improve_examples(
    kept: list[dict], sft_rows: list[dict], cfg: RestConfig, tokenizer, rng: random.Random
) -> list[dict]:
    """The kept samples as token examples (exactly as sampled, EOS only where the policy emitted it),
    plus `sft_mix` SFT rows per kept sample."""
    examples = []
    for row in kept:  # the prompt cut from the left, as everywhere: the response is what is trained on
        examples.append(fit(row["prompt_ids"], row["response_ids"], cfg.max_length))
    extra = min(round(cfg.improve.sft_mix * len(kept)), len(sft_rows))
    examples += [
        encode(tokenizer, row["prompt"], row["response"], cfg.max_length, True)
        for row in (render_row(tokenizer, r) for r in rng.sample(sft_rows, extra))
    ]
    return examples


def load_policy(start: Path, paths: Paths, cfg: RestConfig):
    """(policy, SFT): the iteration's start policy to train, and SFT frozen. With LoRA, an adapter on SFT
    (iteration 1's fresh one, continued by later iterations), SFT being the same weights with the adapter
    off; a start policy with another base (a champion saved whole) needs SFT as a second copy."""
    device, dtype = distributed.device(), precision.resolve_dtype(cfg.compute.dtype)

    def sft():
        return load_causal_lm(paths.sft, dtype=dtype).eval().requires_grad_(False).to(device)

    if cfg.lora is None:
        return load_causal_lm(start, dtype=torch.float32).to(device), sft()
    from alignment.models.lora import AdapterDisabled, load_for_training

    policy, base = load_for_training(start, cfg.lora, cfg.improve.train.seed, dtype)
    policy = policy.to(device)
    if Path(base).resolve() == paths.sft.resolve():
        return policy, AdapterDisabled(policy)
    return policy, sft()


def run(cfg: RestConfig, paths: Paths, log: Tracker | None, iteration: int) -> dict[str, float]:
    out, start = paths.rest(iteration), paths.resolve(cfg.iterations[str(iteration)])
    main = distributed.is_main()  # several processes: the main one writes, the others wait
    if out.exists() and main:
        shutil.rmtree(out)
    distributed.barrier()
    report = previous_report(paths, iteration)
    history = report["history"]

    # step 1. an earlier iteration stopped the run: this one does not train
    if report["stopped"]:
        logger.warning("iteration %d skipped: %s", iteration, report["stopped"])
        metrics = {"iteration": iteration, "skipped": 1}
        if main:
            shutil.copytree(start, out / "policy")
            (out / "report.json").write_text(
                json.dumps(report | {"skipped": [*report.get("skipped", []), iteration]}, indent=2)
            )
            write_metrics(paths.metrics(f"rest_iter@{iteration}"), metrics)
        return metrics

    tokenizer = load_tokenizer(start)
    policy, sft = load_policy(start, paths, cfg)
    check_max_length(cfg.max_length, policy, "rest.max_length")
    rm = reward_scorer(paths, cfg.reward_model, cfg.max_length, cfg.compute)
    reward = stage_reward(cfg, paths, rm)  # Grow's: the RM, or a reward computed by code
    code = reward if isinstance(reward, RewardSource) else None
    judges = held_out_judges(paths, rm, cfg.source, code, tokenizer)
    eval_prompts = load_prompts(paths, "eval", cfg.source, cfg.eval_prompts, tokenizer)

    def held_out(model) -> dict[str, float]:
        with sharding.gathered(model, sft):  # whole on every process (FSDP2): each samples its own block
            scores, _ = compare_to_sft(
                model, sft, tokenizer, eval_prompts, cfg.samples, cfg.seed, judges, cfg.compute
            )
        return {k: v for k, v in scores.items() if k != "eval/prompts"}

    # step 2. the start policy is iteration 0 of the record
    if not history:
        history = [{"iteration": 0, "policy": str(cfg.iterations["1"])} | held_out(policy)]
        logger.info("iteration 0 (%s): held-out %s", start, held_out_summary(history[0]))

    # step 3. Grow
    prompts, prompt_stats = grow_prompts(cfg, paths, tokenizer)
    logger.info(
        "grow: %d samples for each of %d prompts from %s", cfg.grow.samples_per_prompt, len(prompts), start
    )
    grown = grow(policy, tokenizer, reward, prompts, cfg, iteration)
    rewards = np.array([row["reward"] for row in grown])
    if main:
        write_jsonl(out / "grown.jsonl", grown)

    # step 4. Improve steps on the samples above a rising threshold
    lr = learning_rate(cfg.improve.train.learning_rate, cfg.improve.lr_decay, iteration)
    taus = thresholds(rewards, cfg.improve.threshold, cfg.improve.steps)
    sft_rows = list(read_jsonl(paths.data / "sft_train.jsonl")) if cfg.improve.sft_mix else []
    rng, pad = random.Random(cfg.seed * 1_000 + iteration), collate(tokenizer.pad_token_id)
    record: dict = {
        "iteration": iteration,
        "policy": str(out / "policy"),
        "learning_rate": lr,
        f"grow/{cfg.reward}_reward": float(rewards.mean()),  # grow/rm_reward, or grow/code_reward
        "grow/samples": len(grown),
        **prompt_stats,
    }
    kept_rows, offset = [], 0
    for i, tau in enumerate(taus):
        kept = [grown[j] for j in above(rewards, tau)]
        record |= {
            f"improve/tau_{i}": tau,
            f"improve/kept_fraction_{i}": len(kept) / len(grown),
            f"improve/kept_{cfg.reward}_reward_{i}": float(np.mean([r["reward"] for r in kept]))
            if kept
            else float("nan"),
        }
        kept_rows += [
            {"improve_step": i, "tau": tau, **{k: r[k] for k in ("prompt", "index", "response", "reward")}}
            for r in kept
        ]
        logger.info(
            "improve step %d: tau %.3f keeps %d of %d samples (lr %.2g)", i, tau, len(kept), len(grown), lr
        )
        if not kept:
            logger.warning("improve step %d: no sample above tau %.3f; the step trains nothing", i, tau)
            continue
        examples = improve_examples(kept, sft_rows, cfg, tokenizer, rng)
        train_cfg = cfg.improve.train.model_copy(
            update={"learning_rate": lr, "seed": cfg.improve.train.seed + 100 * iteration + i}
        )
        result = train(
            policy,
            examples,
            pad,
            nll_step,
            count_response_tokens,
            train_cfg,
            log_metrics=(lambda m, s, o=offset: log.metrics(m, step=o + s)) if log else None,
        )
        offset += result.steps
        record[f"improve/loss_{i}"] = result.history[-1]["loss"] if result.history else float("nan")
    record["improve/steps"] = offset
    if main:
        write_jsonl(out / "kept.jsonl", kept_rows)
    save_model(policy, tokenizer, out / "policy", cfg.lora)

    # step 5. held-out judge and the guard
    record |= held_out(policy)
    history = [*history, record]
    stopped = guard(history, cfg.guard)
    if stopped:
        logger.warning("ReST stops: %s", stopped)
    metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))} | {
        "guard/stopped": int(bool(stopped))
    }
    if main:
        (out / "report.json").write_text(json.dumps({"history": history, "stopped": stopped}, indent=2))
        write_metrics(paths.metrics(f"rest_iter@{iteration}"), metrics)
    if log is not None:
        log.metrics({k: v for k, v in metrics.items() if not k.startswith("improve/loss")}, step=offset)
        log.table(
            [
                {k: r[k] for k in ("improve_step", "tau", "prompt", "response", "reward")}
                for r in kept_rows[:64]
            ],
            "kept.json",
        )
        if stopped:
            log.tags({"guard": stopped})
    logger.info(
        "iteration %d: grown %s reward %.3f; held-out %s",
        iteration,
        cfg.reward,
        record[f"grow/{cfg.reward}_reward"],
        held_out_summary(record),
    )
    return metrics

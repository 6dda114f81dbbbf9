"""evaluate: every policy against the reference (gold) responses on the same held-out prompts.

1. Prompts and references: the first `prompts` distinct prompts of `source` in the held-out split,
   each with its held-out response (the human review's continuation, cut to the samples' length).
2. Samples: every model in `models` continues every prompt once with the same decoding settings
   and per-prompt seeds (cached by model hash, settings and prompt); best-of-n draws max(n) samples
   of its policy and the reward model keeps the best of the first n.
3. Judges, one interface: the reward model, the gold scorer and the functions of a reward computed by
   code (`rewards`: each by its name, its mean e.g. the accuracy, and their sum `code`) compare scores;
   an LLM judge (when `llm_judge.backend` is set) compares the two responses in both orders.
4. Per model: win rate against the reference with 95% bootstrap intervals per judge, and the
   length-controlled win rate (the judge's preference at equal length in tokens, Dubois et al. 2024),
   mean rewards, KL to the first model (SFT) on the model's own samples, response length statistics.
5. Leaderboard (markdown + JSON), `metrics/evaluate.json`, the reward-KL frontier and the win-rate
   chart (DVC plots and MLflow figures), one MLflow child run per model for side-by-side comparison.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from alignment.config import EvaluateConfig
from alignment.data.io import write_jsonl, write_metrics
from alignment.evaluation.judging import ScalarJudge, build_llm_judge
from alignment.evaluation.leaderboard import (
    GenerationCache,
    Samples,
    best_of,
    best_of_n_kl,
    content_tokens,
    frontier_figure,
    held_out_references,
    judge_model,
    leaderboard_markdown,
    length_stats,
    sample,
    token_lengths,
    win_rate_figure,
)
from alignment.paths import Paths, hash_paths
from alignment.plots import write_csv
from alignment.precision import autocast, resolve_dtype
from alignment.registry import leaderboard_models
from alignment.stages.common import gold_reward, reward_model_path, reward_scorer
from alignment.tracking import Tracker
from alignment.training import distributed

logger = logging.getLogger(__name__)


def scalar_judges(cfg: EvaluateConfig, paths: Paths, tokenizer) -> list[ScalarJudge]:
    """The RM, the gold scorer and, with `rewards`, each function of code (e.g. exact_match: the accuracy)
    and their weighted sum `code`."""
    from alignment.rewards.source import RewardSource

    judges, models = [], {}
    if cfg.reward_model:
        rm_path = reward_model_path(paths, cfg.reward_model)
        scorer = reward_scorer(paths, cfg.reward_model, cfg.max_length, cfg.compute)
        models["rm"] = lambda p, r, f: scorer(p, r, f).numpy()
        judges.append(ScalarJudge("rm", models["rm"], {"model": str(rm_path), "hash": hash_paths([rm_path])}))
    if cfg.gold and cfg.source == "imdb":
        models["gold"] = gold_reward(paths)
        identity = {"model": "TF-IDF + logistic regression (IMDb)", "hash": hash_paths([paths.gold])}
        judges.append(ScalarJudge("gold", models["gold"], identity))
    if cfg.rewards is not None:
        code = RewardSource.from_config(cfg.rewards, models)
        functions = {
            f.label: {"code": f.function, "weight": f.weight, **f.kwargs} for f in cfg.rewards.functions
        }
        for name, score in code.judges(tokenizer).items():
            identity = functions.get(name) or {"code": "weighted sum", "terms": list(functions)}
            judges.append(ScalarJudge(name, score, identity))
    return judges


def run(cfg: EvaluateConfig, paths: Paths, log: Tracker | None) -> dict:
    from alignment.evaluation.heldout import kl_summary, kl_to_reference
    from alignment.models.loading import load_causal_lm, load_tokenizer

    models = cfg.models or leaderboard_models()
    located = {name: paths.resolve(path) for name, path in models.items()}
    present = {name: path for name, path in located.items() if (path / "config.json").exists()}
    skipped = sorted(set(models) - set(present))
    for name in skipped:
        logger.warning("model %s: no saved model at %s, skipped", name, models[name])
    if not present:
        raise ValueError(f"evaluate.models: none of {dict(models)} holds a saved model")
    reference_name = next(iter(present))
    if cfg.best_of_n.n and cfg.best_of_n.policy not in present:
        raise ValueError(
            f"evaluate.best_of_n.policy {cfg.best_of_n.policy!r} is not among the models found: "
            f"{sorted(present)}"
        )
    tokenizer = load_tokenizer(present[reference_name])
    held_out = held_out_references(
        paths, cfg.source, cfg.split, cfg.prompts, tokenizer, cfg.reference_max_tokens
    )
    prompts, references = held_out.prompts, held_out.responses
    reference_tokens = token_lengths(tokenizer, references)
    settings = {
        "max_new_tokens": cfg.samples.max_new_tokens,
        "temperature": cfg.samples.temperature,
        "top_p": cfg.samples.top_p,
        "seed": cfg.seed,
    }
    cache = GenerationCache(paths.checkpoints("evaluate") / "generations")
    judges = scalar_judges(cfg, paths, tokenizer)
    limits = {}
    if cfg.llm_judge.backend != "none":
        judges.append(
            build_llm_judge(
                cfg.llm_judge,
                cfg.source,
                paths.checkpoints("evaluate") / "judge_cache",
                root=paths.root,
                dtype=resolve_dtype(cfg.compute.dtype),
            )
        )
        limits["llm"] = cfg.llm_judge.max_prompts or len(prompts)
    if not judges:
        raise ValueError("evaluate: no judge (set reward_model, gold or llm_judge.backend)")
    identities = {judge.name: judge.identity() for judge in judges}
    logger.info(
        "evaluating %s on %d %s/%s prompts with judges %s",
        sorted(present),
        len(prompts),
        cfg.source,
        cfg.split,
        [j.name for j in judges],
    )

    # several processes draw the samples and score the KL, each a block of the prompts; the main process
    # alone judges (LLM judges keep caches: one writer) and reports
    device, dtype = distributed.device(), resolve_dtype(cfg.compute.dtype)
    reference_model = load_causal_lm(present[reference_name], dtype=dtype).eval().to(device)
    rows, per_prompt = [], {"prompt": prompts, "reference": references}
    drawn = {}
    for name, path in present.items():
        model = load_causal_lm(path, dtype=dtype).eval().to(device)
        model_hash = hash_paths([path])
        if model.config.vocab_size != reference_model.config.vocab_size:
            raise ValueError(
                f"evaluate.models.{name}: vocabulary of {model.config.vocab_size} tokens, the reference "
                f"{reference_name} has {reference_model.config.vocab_size}; KL needs a shared tokenizer"
            )
        want = max(cfg.best_of_n.n) if name == cfg.best_of_n.policy and cfg.best_of_n.n else 1
        at_once = cfg.compute.scoring_batch_size
        with autocast(dtype):
            samples, new = sample(
                model,
                model_hash,
                tokenizer,
                prompts,
                settings,
                cache,
                want,
                cfg.compute.generation_batch_size,
            )
            first = samples[0]
            kl = np.asarray(
                distributed.map_sharded(
                    lambda part: list(kl_to_reference(model, reference_model, part, at_once)), first.ids
                )
            )
        drawn[name] = samples
        if not distributed.is_main():
            continue
        metrics, judgements = judge_model(
            judges,
            prompts,
            first.responses,
            references,
            limits,
            cfg.bootstrap_resamples,
            cfg.seed,
            lengths=(content_tokens(first), reference_tokens),
            finished=(first.ended, np.array(held_out.finished)),
            questions=held_out.questions,
        )
        row = {
            "model": name,
            "kind": "policy",
            "path": str(path),
            "model_hash": model_hash,
            "samples_drawn": new,
            **kl_summary(kl),
            **length_stats(first),
            **metrics,
        }
        rows.append(row)
        per_prompt[name] = first.responses
        for judge_name, judgement in judgements.items():
            per_prompt[f"{name}/{judge_name}"] = judgement.outcomes.tolist()
        logger.info(
            "%s: %s; KL %.2f, %.1f tokens (%d samples drawn, the rest cached)",
            name,
            ", ".join(f"{j.name} win rate {metrics[f'{j.name}/win_rate']:.3f}" for j in judges),
            row["objective/kl"],
            row["length/mean_tokens"],
            new,
        )

    if not distributed.is_main():
        return {}
    if cfg.best_of_n.n:
        policy_samples = drawn[cfg.best_of_n.policy]
        rows += best_of_n_rows(cfg, judges, policy_samples, held_out, reference_tokens, limits)

    for judge in judges:  # what a served judge cost: requests made, answers from the cache, retries, failures
        if hasattr(getattr(judge, "backend", None), "stats"):
            identities[judge.name] = identities[judge.name] | {"stats": dict(judge.backend.stats)}
    return report(cfg, paths, log, rows, per_prompt, identities, skipped, [j.name for j in judges])


def best_of_n_rows(cfg: EvaluateConfig, judges, samples, held_out, reference_tokens, limits) -> list[dict]:
    """Best-of-n of the policy's samples, picked by the reward model or (`best_of_n.reward: code`) the
    reward computed by code (never by a judge it is scored by other than the picker itself, whose win
    rate is then optimistic by construction; with a verifier, the share of prompts one of n solves)."""
    picker = next((j for j in judges if j.name == cfg.best_of_n.reward), None)
    if picker is None:
        raise ValueError(f"evaluate.best_of_n picks by {cfg.best_of_n.reward!r}, which is not a judge here")
    prompts, references = held_out.prompts, held_out.responses
    scores = np.stack([picker.scores(prompts, s.responses, s.ended) for s in samples], axis=1)  # (prompts, N)
    rows = []
    for n in sorted(cfg.best_of_n.n):
        pick = best_of(scores, n)
        chosen = [samples[j].responses[i] for i, j in enumerate(pick)]
        tokens = np.array([samples[j].tokens[i] for i, j in enumerate(pick)])
        ended = np.array([samples[j].ended[i] for i, j in enumerate(pick)])
        ids = [samples[j].ids[i] for i, j in enumerate(pick)]
        picked = Samples(chosen, tokens, ended, ids)
        metrics, _ = judge_model(
            judges,
            prompts,
            chosen,
            references,
            limits,
            cfg.bootstrap_resamples,
            cfg.seed,
            lengths=(content_tokens(picked), reference_tokens),
            finished=(ended, np.array(held_out.finished)),
            questions=held_out.questions,
        )
        rows.append(
            {
                "model": f"best_of_{n}",
                "kind": "best_of_n",
                "policy": cfg.best_of_n.policy,
                "n": n,
                "objective/kl": best_of_n_kl(n),
                **length_stats(picked),
                **metrics,
            }
        )
        logger.info(
            "best-of-%d (%s): %s",
            n,
            cfg.best_of_n.policy,
            ", ".join(f"{j.name} win rate {metrics[f'{j.name}/win_rate']:.3f}" for j in judges),
        )
    return rows


def report(
    cfg: EvaluateConfig,
    paths: Paths,
    log: Tracker | None,
    rows: list[dict],
    per_prompt: dict,
    identities: dict,
    skipped: list[str],
    judge_names: list[str],
) -> dict:
    out = paths.out("evaluate")
    out.mkdir(parents=True, exist_ok=True)
    decoding = cfg.samples.model_dump(exclude={"num_prompts"}) | {"seed": cfg.seed}
    board = {
        "prompts": len(per_prompt["prompt"]),
        "source": cfg.source,
        "split": cfg.split,
        "decoding": decoding,
        "reference_max_tokens": cfg.reference_max_tokens,
        "judges": identities,
        "skipped_models": skipped,
        "models": rows,
    }
    (out / "leaderboard.json").write_text(json.dumps(board, indent=2) + "\n")
    markdown = (
        f"# Leaderboard: win rate against the reference response\n\n{len(per_prompt['prompt'])} held-out "
        f"{cfg.source} prompts ({cfg.split}); decoding {json.dumps(decoding)}; reference cut to "
        f"{cfg.reference_max_tokens} tokens. Judges: "
        + "; ".join(f"{name} = {json.dumps(identity)}" for name, identity in identities.items())
        + ".\n\n"
        + leaderboard_markdown(rows, judge_names, identities)
    )
    (out / "leaderboard.md").write_text(markdown)
    responses = [dict(zip(per_prompt, values)) for values in zip(*per_prompt.values())]
    write_jsonl(out / "responses.jsonl", responses)

    # a reward computed by code's mean (exact_match/reward: the accuracy) leads, beside the win rates
    code_means = {f"{name}/reward" for name, identity in identities.items() if "code" in identity}

    def headline_first(key: str) -> int:  # what `dvc metrics show` and the flow summary show first
        if key.endswith("/win_rate") or key in code_means:
            return 0
        return 1 if key in ("objective/kl", "length/mean_tokens") else 2

    metrics = {
        row["model"]: {
            key: row[key]
            for key in sorted(row, key=headline_first)
            if isinstance(row[key], (int, float)) and not isinstance(row[key], bool)
        }
        for row in rows
    }
    write_metrics(paths.metrics("evaluate"), metrics)
    plot_judge = "gold" if "gold" in judge_names else judge_names[0]
    frontier_columns = [
        "model",
        "objective/kl",
        *[f"{j}/reward" for j in judge_names if f"{j}/reward" in rows[0]],
    ]
    write_csv(paths.plots("evaluate") / "frontier.csv", rows, frontier_columns)
    bars = [
        {
            "model_judge": f"{r['model']} · {j}",
            "win_rate": r[f"{j}/win_rate"],
            "ci_low": r[f"{j}/win_rate_ci_low"],
            "ci_high": r[f"{j}/win_rate_ci_high"],
            "lc_win_rate": r[f"{j}/lc_win_rate"],
        }
        for r in rows
        for j in judge_names
        if f"{j}/win_rate" in r
    ]
    write_csv(
        paths.plots("evaluate") / "win_rates.csv",
        bars,
        ["model_judge", "win_rate", "ci_low", "ci_high", "lc_win_rate"],
    )

    if log is not None:
        log.artifact(out / "leaderboard.md")
        log.artifact(out / "leaderboard.json")
        log.tags({f"judge.{name}": json.dumps(identity) for name, identity in identities.items()})
        if any(f"{plot_judge}/reward" in r for r in rows):
            log.figure(frontier_figure(rows, plot_judge), "plots/frontier.png")
        log.figure(win_rate_figure(rows, judge_names), "plots/win_rates.png")
        log.table(responses[: cfg.samples.num_prompts], "held_out_generations.json")
        for row in rows:
            with log.child_run(
                f"evaluate/{row['model']}",
                {
                    "kind": "evaluation",
                    "model": row["model"],
                    "policy_kind": row["kind"],
                    "model_hash": row.get("model_hash", ""),
                },
            ) as child:
                child.params(
                    {
                        "model": row["model"],
                        "path": row.get("path", ""),
                        "policy": row.get("policy", row["model"]),
                        **{f"decoding.{k}": v for k, v in decoding.items()},
                    }
                )
                child.metrics(metrics[row["model"]])
    flat = {
        f"{model}/{key}": value
        for model, values in metrics.items()
        for key, value in values.items()
        if key.endswith(("/win_rate", "/lc_win_rate", "/reward", "objective/kl"))
    }
    return flat

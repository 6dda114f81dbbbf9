"""A trained policy against the SFT model on held-out prompts: both continue the same prompts under
the same seed; judges (the gold scorer, the reward model) score both; the policy's KL to SFT is
estimated on its own samples."""
from __future__ import annotations

import numpy as np
import torch

from alignment.batching import collate, encode
from alignment.config import SampleConfig
from alignment.generation import generate
from alignment.losses import sequence_logps


@torch.no_grad()
def kl_to_reference(policy, reference, tokenizer, prompts: list[str], responses: list[str], max_length: int) -> np.ndarray:
    """Per-sample log pi(y|x) - log pi_ref(y|x) on the policy's own samples (the k1 estimator; its mean
    is KL(pi || pi_ref)). Responses are re-tokenized from text, without a closing EOS."""
    encoded = [encode(tokenizer, p, r, max_length, add_eos=False) for p, r in zip(prompts, responses)]
    pad, out = collate(tokenizer.pad_token_id), []
    for start in range(0, len(encoded), 64):
        batch = pad(encoded[start : start + 64])
        logps = [sequence_logps(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
                 for m in (policy, reference)]
        out.append((logps[0] - logps[1]).numpy())
    return np.concatenate(out)


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows where a beats b, a tie counting half."""
    return float(np.mean(a > b) + 0.5 * np.mean(a == b))


def compare_to_sft(policy, reference, tokenizer, prompts: list[str], samples: SampleConfig, max_length: int, seed: int,
                   judges: dict) -> tuple[dict[str, float], list[dict]]:
    """Policy vs SFT on the same prompts. `judges` maps a name ("gold", "rm") to a function
    (prompts, responses) -> scores; each gives `<name>/reward`, `<name>/sft_reward` and
    `<name>/win_rate_vs_sft`. `objective/kl` is the mean k1 estimate of KL(policy || SFT)."""
    torch.manual_seed(seed)
    policy_responses = generate(policy, tokenizer, prompts, samples.max_new_tokens, samples.temperature, samples.top_p)
    torch.manual_seed(seed)
    sft_responses = generate(reference, tokenizer, prompts, samples.max_new_tokens, samples.temperature, samples.top_p)
    kl = kl_to_reference(policy, reference, tokenizer, prompts, policy_responses, max_length)
    metrics: dict[str, float] = {"objective/kl": float(kl.mean()), "eval/prompts": len(prompts)}
    rows = [{"prompt": p, "policy": r, "sft": q, "kl": float(k)} for p, r, q, k in zip(prompts, policy_responses, sft_responses, kl)]
    for name, judge in judges.items():
        policy_scores = np.asarray(judge(prompts, policy_responses), dtype=float)
        sft_scores = np.asarray(judge(prompts, sft_responses), dtype=float)
        metrics |= {f"{name}/reward": float(policy_scores.mean()), f"{name}/sft_reward": float(sft_scores.mean()),
                    f"{name}/win_rate_vs_sft": win_rate(policy_scores, sft_scores)}
        for row, s, t in zip(rows, policy_scores, sft_scores):
            row |= {f"policy_{name}": float(s), f"sft_{name}": float(t)}
    return metrics, rows

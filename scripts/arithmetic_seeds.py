"""The arithmetic profile (configs/arithmetic) over seeds: SFT -> GRPO and RLOO per seed, then the table of
held-out accuracy with t intervals over the seeds that docs/rewards.md shows.

    OMP_NUM_THREADS=1 python scripts/arithmetic_seeds.py --seeds 0 1 2 --out outputs/arithmetic_seeds

Each seed runs in a folder of its own under --out: the profile's params with sft.train.seed,
grpo.train.seed and rloo.train.seed set to the seed (the problems, their split and the tokenizer stay the
profile's), every stage of its pipeline but evaluate as `python -m alignment <stage> --no-tracking`.
The accuracies are the GRPO and RLOO stages' own held-out comparisons: every test problem, the SFT model
and the policy sampled under the same per-prompt seeds, scored by `exact_match`; SFT's is the one GRPO's
comparison measured (RLOO's measures the same model on the same samples). "Adds" is the paired
difference over seeds (policy - SFT of the same seed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignment.evaluation.sweep_stats import difference_interval, t_interval  # noqa: E402

PROFILE = ROOT / "configs" / "arithmetic" / "params.yaml"
SEEDED = ("sft", "grpo", "rloo")


def run_seed(seed: int, folder: Path) -> dict:
    """The profile's stages (evaluate aside) for one seed in `folder`; its metrics and stage wall times."""
    params = YAML(typ="safe").load(PROFILE.read_text())
    for section in SEEDED:
        params[section]["train"]["seed"] = seed
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "params.yaml", "w") as f:
        YAML().dump(params, f)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seconds = {}
    for stage in (s for s in params["pipeline"]["stages"] if s != "evaluate"):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "alignment", stage, "--no-tracking"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(f"seed {seed}, {stage} failed:\n{done.stderr[-4000:]}")
        seconds[stage] = time.perf_counter() - started
        print(f"seed {seed}: {stage} {seconds[stage]:.0f} s", flush=True)
    metrics = {s: json.loads((folder / "metrics" / f"{s}.json").read_text()) for s in ("grpo", "rloo")}
    return {"seed": seed, "seconds": seconds, "metrics": metrics}


def greedy_accuracy(folder: Path, model: str) -> float:
    """The accuracy of `folder`'s outputs/<model> on the test problems decoded greedily (temperature 0):
    the stages report sampled accuracy; this is the other common reading."""
    from alignment.data.io import read_jsonl
    from alignment.models.generation import generate
    from alignment.models.loading import load_causal_lm, load_tokenizer
    from alignment.rewards.functions import exact_match

    path = folder / "outputs" / model
    rows = list(read_jsonl(folder / "outputs" / "data" / "prompts_test.jsonl"))
    responses = generate(
        load_causal_lm(path).eval(), load_tokenizer(path), [r["prompt"] for r in rows], 24, 0.0
    )
    scores = exact_match(responses, answer=[r["answer"] for r in rows])
    return sum(scores) / len(scores)


def cell(values: list[float], digits: int = 3) -> str:
    mean, low, high = t_interval(values)
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def table(runs: list[dict]) -> str:
    """Markdown: accuracy (sampled, and greedy) and format rate of SFT, GRPO and RLOO (mean [95% t
    interval] over seeds, and per seed), what each method adds over SFT (paired), and its KL to SFT."""
    grpo = [r["metrics"]["grpo"] for r in runs]
    rloo = [r["metrics"]["rloo"] for r in runs]
    rows = {
        "SFT": (
            [m["exact_match/sft_reward"] for m in grpo],
            [m["answer_format/sft_reward"] for m in grpo],
            None,
        ),
        "GRPO": ([m["exact_match/reward"] for m in grpo], [m["answer_format/reward"] for m in grpo], grpo),
        "RLOO": ([m["exact_match/reward"] for m in rloo], [m["answer_format/reward"] for m in rloo], rloo),
    }
    sft = rows["SFT"][0]
    lines = [
        f"| model | held-out accuracy, {len(runs)} seeds [95% t interval] | per seed | adds over SFT "
        "(paired) | greedy accuracy (per seed) | answer format | KL to SFT (nats) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (accuracy, fmt, metrics) in rows.items():
        per_seed = " / ".join(f"{a:.3f}" for a in accuracy)
        greedy_values = [r["greedy"][name.lower()] for r in runs]
        greedy = f"{cell(greedy_values)} ({' / '.join(f'{g:.3f}' for g in greedy_values)})"
        if metrics is None:
            adds, kl = "–", "–"
        else:
            diff, low, high = difference_interval(accuracy, sft, paired=True)
            adds = f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"
            kl = cell([m["objective/kl"] for m in metrics], 2)
        lines.append(f"| {name} | {cell(accuracy)} | {per_seed} | {adds} | {greedy} | {cell(fmt)} | {kl} |")
    prompts = int(grpo[0]["eval/prompts"])
    return "\n".join(lines) + (
        f"\n\n{prompts} held-out test problems per seed; accuracy sampled at temperature 1 (the stages' "
        "held-out comparison), greedy accuracy at temperature 0.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "arithmetic_seeds")
    parser.add_argument("--table-only", action="store_true", help="report the seeds already run in --out")
    args = parser.parse_args(argv)
    if args.table_only:
        runs = json.loads((args.out / "runs.json").read_text())
    else:
        runs = [run_seed(seed, args.out / f"seed_{seed}") for seed in args.seeds]
    for run in runs:
        folder = args.out / f"seed_{run['seed']}"
        run["greedy"] = {model: greedy_accuracy(folder, model) for model in ("sft", "grpo", "rloo")}
    text = table(runs)
    seconds = [sum(r["seconds"].values()) for r in runs]
    walls = ", ".join(f"{s:.0f} s" for s in seconds)
    text += f"Wall time per seed (prepare -> tokenizer -> SFT -> GRPO -> RLOO): {walls}.\n"
    (args.out / "table.md").write_text(text)
    (args.out / "runs.json").write_text(json.dumps(runs, indent=2))  # with the greedy accuracies
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

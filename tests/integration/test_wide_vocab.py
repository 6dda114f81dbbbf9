"""The wide-vocabulary smoke (configs/wide-vocab-smoke/): a Qwen2-style twin with Qwen2.5's 151,665-token
tokenizer, an embedding of 151,936 rows and two end ids, HH dialogues of 512+ tokens and held-out and
evaluate batches of 64 prompts, through every stage in one `dvc repro`, each stage's process under 4 GiB
resident; every sample ends at the first of the family's end ids or at max_new_tokens, never past the
tokenizer. And the profiles per model size: the GPU profiles and their CPU twins agree on what makes a
twin (family, vocabulary, end tokens, LoRA placement, stages)."""

import json
import os
import re
import subprocess

import pytest
from ruamel.yaml import YAML

from tests.conftest import MICRO_PARAMS, ROOT, copy_project

SMOKE = "configs/wide-vocab-smoke"
LIMIT_MIB = 4096
END_IDS = {151645, 151643}  # <|im_end|> (the end of turn, Qwen2.5-Instruct's EOS) and <|endoftext|>
TOKENIZER = 151_665
# "stage" and "seconds", then the peak, open the JSON each `python -m alignment <stage>` prints
PEAK = re.compile(r'"stage": "([^"]+)",\s*"seconds": [\d.]+,\s*"peak_rss_mib": ([\d.]+)')


def load(path):
    return YAML(typ="safe").load(path.read_text())


def test_twins_match_their_gpu_profiles():
    """A twin has its GPU profile's architecture family, vocabulary, end tokens, LoRA placement (LoRA
    critic included) and stages; only the width, the data and the step counts are small."""
    for gpu, twin in (("qwen2.5-7b-lora", "wide-vocab-smoke"), ("qwen2.5-0.5b", "qwen2.5-0.5b-twin")):
        full, small = (
            load(ROOT / "configs" / gpu / "params.yaml"),
            load(ROOT / "configs" / twin / "params.yaml"),
        )
        assert full["sft"]["model"]["name_or_path"].startswith("Qwen/Qwen2.5-")
        assert small["tokenizer"]["family"] == "qwen2" and small["sft"]["model"]["arch"] == "qwen2"
        assert small["sft"]["model"]["vocab_size"] == 151_936
        assert small["sft"]["model"]["eos_tokens"] == ["<|im_end|>", "<|endoftext|>"]
        assert set(full["pipeline"]["stages"]) <= set(small["pipeline"]["stages"])
        for section in full:
            if isinstance(full[section], dict):
                assert ("lora" in full[section]) == ("lora" in small.get(section, {})), (twin, section)
        assert ("critic_lora" in full["ppo"]) == ("critic_lora" in small["ppo"]), twin


@pytest.mark.slow
def test_every_stage_runs_under_4_gib_on_a_151k_vocabulary(tmp_path):
    root = copy_project(tmp_path / "project", MICRO_PARAMS)
    # the copy's own code (not an editable install elsewhere) runs every stage
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(root)}
    folder = root / SMOKE
    done = subprocess.run(["dvc", "repro"], cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    peaks = {stage: float(mib) for stage, mib in PEAK.findall(done.stdout)}
    print(json.dumps(peaks))  # the numbers of docs/scale.md
    stages = load(folder / "params.yaml")["pipeline"]["stages"]
    assert set(peaks) == {*stages, "rest_iter@1"} - {"rest_iter"}
    assert max(peaks.values()) < LIMIT_MIB, peaks

    # the prompts are long: the held-out prompts' tokens, and what the stages trained on
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in read_samples(folder)]
    assert max(lengths) >= 512
    for row in read_samples(folder):
        response = row["response_ids"]
        assert all(i < TOKENIZER for i in response)  # never a row of the padded embedding
        ends = [k for k, i in enumerate(response) if i in END_IDS]
        if row["ended"]:
            assert ends == [len(response) - 1]  # stopped at its first end id
        else:
            assert not ends and len(response) == 16  # cut at max_new_tokens
    leaderboard = (folder / "outputs/evaluate/leaderboard.md").read_text()
    for model in ("sft", "dpo", "brain", "ppo", "grpo", "rloo", "rest", "best_of_2"):
        assert f"| {model} |" in leaderboard, model
    assert "llm/win_rate" in (folder / "metrics/evaluate.json").read_text()


def read_samples(folder):
    """Every sample evaluate drew and cached: the sampled ids, and whether the model ended it."""
    for path in sorted((folder / "checkpoints/evaluate/generations").glob("*.jsonl")):
        yield from (json.loads(line) for line in path.read_text().splitlines())

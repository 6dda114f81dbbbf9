"""Where each stage reads and writes, relative to the project root. dvc.yaml names the same paths
(tests/test_dvc.py checks that the two agree)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")

    @property
    def data(self) -> Path:  # prepare: {sft,preference,prompts}_{train,eval,test}.jsonl
        return self.root / "outputs" / "data"

    @property
    def tokenizer(self) -> Path:
        return self.root / "outputs" / "tokenizer"

    @property
    def sft(self) -> Path:  # the SFT policy (safetensors + tokenizer) and its sample generations
        return self.root / "outputs" / "sft"

    @property
    def gold(self) -> Path:  # the gold scorer (IMDb sentiment classifier)
        return self.root / "outputs" / "gold" / "scorer.joblib"

    @property
    def pairs(self) -> Path:  # gold-labelled SFT sample pairs: {train,eval}.jsonl
        return self.root / "outputs" / "pairs"

    @property
    def rm(self) -> Path:
        return self.root / "outputs" / "rm"

    @property
    def dpo(self) -> Path:
        return self.root / "outputs" / "dpo"

    @property
    def brain(self) -> Path:
        return self.root / "outputs" / "brain"

    @property
    def brain_variance(self) -> Path:  # the variance experiment's table
        return self.root / "outputs" / "brain_variance"

    @property
    def ppo(self) -> Path:
        return self.root / "outputs" / "ppo"

    def rest(self, iteration: int | str) -> Path:  # ReST iteration k: grown.jsonl, kept.jsonl, report.json, policy/
        return self.root / "outputs" / "rest" / str(iteration)

    @property
    def rest_best(self) -> Path:  # the best ReST iteration's policy and selection.json
        return self.root / "outputs" / "rest_best"

    @property
    def evaluate(self) -> Path:  # leaderboard.{md,json}, responses.jsonl
        return self.root / "outputs" / "evaluate"

    @property
    def rlaif(self) -> Path:  # LLM-judge-labelled pairs: {train,eval}.jsonl
        return self.root / "outputs" / "rlaif"

    def resolve(self, path: str | Path) -> Path:
        """A path from params (relative to the project root) as a path under this root."""
        return Path(path) if Path(path).is_absolute() else self.root / path

    def metrics(self, stage: str) -> Path:  # a foreach stage `rest_iter@2` writes metrics/rest_iter_2.json
        return self.root / "metrics" / f"{stage.replace('@', '_')}.json"

    def plots(self, stage: str) -> Path:
        return self.root / "plots" / stage.replace("@", "_")

    def checkpoints(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage


def hash_paths(paths: list[Path]) -> str:
    """A short content hash of files and folders (the `data_hash` tag; the checkpoint fingerprint)."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            digest.update(f.relative_to(path).as_posix().encode() if path.is_dir() else f.name.encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]

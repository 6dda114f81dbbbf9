"""Where each stage reads and writes, relative to the project root: `out(stage)` is the output folder
the stage registry declares (and dvc.yaml names); the properties name the ones other stages read."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from alignment.registry import get


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")

    def out(self, stage: str, iteration: int | str | None = None) -> Path:
        """The output folder of `stage` (of its item `iteration`, for a foreach stage)."""
        return self.root / get(stage).output.replace("${key}", str(iteration))

    @property
    def data(self) -> Path:  # prepare: {sft,preference,prompts}_{train,eval,test}.jsonl
        return self.out("prepare")

    @property
    def tokenizer(self) -> Path:
        return self.out("tokenizer")

    @property
    def sft(self) -> Path:  # the SFT policy (safetensors + tokenizer) and its sample generations
        return self.out("sft")

    @property
    def gold(self) -> Path:  # the gold scorer (IMDb sentiment classifier): scorer.json + weights.safetensors
        return self.out("gold") / "scorer"

    @property
    def pairs(self) -> Path:  # gold-labelled SFT sample pairs: {train,eval}.jsonl
        return self.out("pairs")

    @property
    def rm(self) -> Path:
        return self.out("rm")

    def rest(
        self, iteration: int | str
    ) -> Path:  # ReST iteration k: grown.jsonl, kept.jsonl, report.json, policy/
        return self.out("rest_iter", iteration)

    @property
    def rest_best(self) -> Path:  # the best ReST iteration's policy and selection.json
        return self.out("rest")

    @property
    def rlaif(self) -> Path:  # LLM-judge-labelled pairs: {train,eval}.jsonl
        return self.out("rlaif")

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

"""Build the embedded default data set from the full copies in ../shared/data.

Deterministic: the same source files and seed give byte-identical outputs (gzip mtime is fixed).
Run from the project root:  python scripts/build_embedded_data.py [--source ../shared/data]
Provenance and licences: data/embedded/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

SEED = 20240207
SFT_REVIEWS = 4000  # IMDb train reviews for SFT and prompts (balanced, at most MAX_REVIEW_CHARS)
GOLD_TRAIN_REVIEWS = 6000  # IMDb train reviews, disjoint from the above: the gold scorer's training set
GOLD_TEST_REVIEWS = 2000  # IMDb test reviews: the gold scorer's test set
# Short reviews keep SFT on a 2-core CPU within minutes; the gold scorer judges short continuations,
# so it is trained and tested on short reviews too.
MAX_REVIEW_CHARS = 1000
HH_PAIRS_PER_SPLIT = 1200  # from each of harmless-base_test and helpful-base_test


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    # mtime=0 so that rebuilding gives the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"{path}: {len(rows)} rows, {path.stat().st_size / 1e6:.2f} MB")


def balanced_sample(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    by_label = {label: [r for r in rows if r["label"] == label] for label in (0, 1)}
    picked = [r for label in (0, 1) for r in rng.sample(by_label[label], n // 2)]
    rng.shuffle(picked)
    return picked


def has_shared_prompt(pair: dict) -> bool:
    cut = lambda s: s[: s.rfind("\n\nAssistant:")]  # noqa: E731
    return cut(pair["chosen"]) == cut(pair["rejected"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "embedded")
    args = parser.parse_args()
    rng = random.Random(SEED)
    args.out.mkdir(parents=True, exist_ok=True)

    imdb_train = read_jsonl_gz(args.source / "imdb" / "imdb_train.jsonl.gz")
    short = [r for r in imdb_train if len(r["text"]) <= MAX_REVIEW_CHARS]
    sft_reviews = balanced_sample(short, SFT_REVIEWS, rng)
    used = {r["id"] for r in sft_reviews}
    gold_train = balanced_sample([r for r in short if r["id"] not in used], GOLD_TRAIN_REVIEWS, rng)
    imdb_test = read_jsonl_gz(args.source / "imdb" / "imdb_test.jsonl.gz")
    gold_test = balanced_sample(
        [r for r in imdb_test if len(r["text"]) <= MAX_REVIEW_CHARS], GOLD_TEST_REVIEWS, rng
    )
    write_jsonl_gz(args.out / "imdb_reviews.jsonl.gz", sft_reviews)
    write_jsonl_gz(args.out / "imdb_gold_train.jsonl.gz", gold_train)
    write_jsonl_gz(args.out / "imdb_gold_test.jsonl.gz", gold_test)

    hh = []
    for split in ("harmless-base_test", "helpful-base_test"):
        pairs = read_jsonl_gz(args.source / "hh-rlhf" / f"{split}.jsonl.gz")
        # keep every known quirk (no shared prompt) so that prepare's drop report is exercised on real data
        quirks = [p for p in pairs if not has_shared_prompt(p)]
        rest = rng.sample([p for p in pairs if has_shared_prompt(p)], HH_PAIRS_PER_SPLIT - len(quirks))
        hh += [{"source": split, **p} for p in quirks + rest]
    rng.shuffle(hh)
    write_jsonl_gz(args.out / "hh_pairs.jsonl.gz", hh)


if __name__ == "__main__":
    main()

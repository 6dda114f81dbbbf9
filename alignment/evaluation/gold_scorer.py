"""The gold scorer of the controlled-sentiment task: a TF-IDF + logistic-regression classifier trained
on labelled IMDb reviews the pipeline never uses for SFT or prompts. It plays the human: preference
pairs are labelled by it and every policy is judged by it, but nothing is ever trained against it.
Gold reward = the classifier's log-odds that a text is positive.

Saved as data only: `scorer.json` (the vectoriser's settings and vocabulary) and `weights.safetensors`
(idf, coefficients, intercept). Loading rebuilds the classifier from them; nothing is unpickled, so a
scorer file from the DVC remote or another worker cannot run code where it is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from alignment.data.sources import clean_review

CONFIG, WEIGHTS = "scorer.json", "weights.safetensors"
FORMAT = 1
# the vectoriser settings that decide how a text becomes features (the rest are fitting-only or None)
TFIDF_SETTINGS = (
    "analyzer",
    "binary",
    "lowercase",
    "ngram_range",
    "norm",
    "smooth_idf",
    "strip_accents",
    "sublinear_tf",
    "token_pattern",
    "use_idf",
)


class GoldScorer:
    """TF-IDF features, then a linear score: `reward(x) = tfidf(x) . coef + intercept`."""

    def __init__(self, vectorizer: TfidfVectorizer, coef: np.ndarray, intercept: float):
        self.vectorizer = vectorizer
        self.coef = coef  # (vocabulary,)
        self.intercept = float(intercept)

    @classmethod
    def fit(cls, texts: list[str], labels: list[int], c: float = 4.0, seed: int = 0) -> GoldScorer:
        pipeline = Pipeline(
            [
                (
                    "tfidf",
                    TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=200_000, sublinear_tf=True),
                ),
                ("logreg", LogisticRegression(C=c, max_iter=2000, random_state=seed)),
            ]
        )
        pipeline.fit([clean_review(t) for t in texts], labels)
        logreg = pipeline.named_steps["logreg"]
        if logreg.classes_.tolist() != [0, 1]:
            raise ValueError(f"gold labels must be 0 and 1, got classes {logreg.classes_.tolist()}")
        return cls(pipeline.named_steps["tfidf"], logreg.coef_[0], logreg.intercept_[0])

    def reward(self, texts: list[str]) -> np.ndarray:
        """(N,) log-odds of "positive"; a text with no known n-gram scores the intercept."""
        features = self.vectorizer.transform(  # sparse (N, vocabulary)
            [clean_review(t) for t in texts]
        )
        return features @ self.coef + self.intercept

    def accuracy(self, texts: list[str], labels: list[int]) -> float:
        return float(np.mean((self.reward(texts) > 0).astype(int) == np.asarray(labels)))

    def save(self, folder: Path) -> None:
        """`folder`/scorer.json and `folder`/weights.safetensors: the same bytes for the same fit."""
        folder.mkdir(parents=True, exist_ok=True)
        vocabulary = sorted(self.vectorizer.vocabulary_, key=self.vectorizer.vocabulary_.get)
        settings = {key: self.vectorizer.get_params()[key] for key in TFIDF_SETTINGS}
        config = {"format": FORMAT, "tfidf": settings, "vocabulary": vocabulary}
        (folder / CONFIG).write_text(json.dumps(config, ensure_ascii=False) + "\n", encoding="utf-8")
        weights = {
            "idf": np.ascontiguousarray(self.vectorizer.idf_, dtype=np.float64),
            "coef": np.ascontiguousarray(self.coef, dtype=np.float64),
            "intercept": np.array([self.intercept], dtype=np.float64),
        }
        save_file(weights, str(folder / WEIGHTS))

    @classmethod
    def load(cls, folder: Path) -> GoldScorer:
        """The scorer `save` wrote, rebuilt from its settings and arrays (no unpickling)."""
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        if config.get("format") != FORMAT:
            raise ValueError(f"{folder / CONFIG}: format {config.get('format')!r}, expected {FORMAT}")
        weights = load_file(str(folder / WEIGHTS))
        vocabulary = {term: index for index, term in enumerate(config["vocabulary"])}
        if not len(vocabulary) == len(weights["idf"]) == len(weights["coef"]):
            raise ValueError(f"{folder}: vocabulary, idf and coefficients differ in length")
        settings = config["tfidf"] | {"ngram_range": tuple(config["tfidf"]["ngram_range"])}
        vectorizer = TfidfVectorizer(**settings, vocabulary=vocabulary)
        vectorizer.idf_ = weights["idf"]
        return cls(vectorizer, weights["coef"], float(weights["intercept"][0]))

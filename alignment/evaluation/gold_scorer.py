"""The gold scorer of the controlled-sentiment task: a TF-IDF + logistic-regression classifier trained
on labelled IMDb reviews the pipeline never uses for SFT or prompts. It plays the human: preference
pairs are labelled by it and every policy is judged by it, but nothing is ever trained against it.
Gold reward = the classifier's log-odds that a text is positive.
"""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from alignment.data.sources import clean_review


class GoldScorer:
    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

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
        return cls(pipeline)

    def reward(self, texts: list[str]) -> np.ndarray:
        """(N,) log-odds of "positive"; a text with no known n-gram scores the intercept."""
        return self.pipeline.decision_function([clean_review(t) for t in texts])

    def accuracy(self, texts: list[str], labels: list[int]) -> float:
        return float(np.mean((self.reward(texts) > 0).astype(int) == np.asarray(labels)))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the vectoriser remembers id(stop_words), a memory address that differs in every process: without
        # it the file is the same bytes for the same fit, so DVC does not see a new scorer on every run
        # (scikit-learn only uses it to skip re-checking the stop words)
        tfidf = self.pipeline.named_steps["tfidf"]
        if hasattr(tfidf, "_stop_words_id"):
            del tfidf._stop_words_id
        joblib.dump(self.pipeline, path)

    @classmethod
    def load(cls, path: Path) -> GoldScorer:
        return cls(joblib.load(path))

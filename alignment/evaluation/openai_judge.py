"""A `judging.Backend` for any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, TGI, OpenAI).

Judging a few thousand pairs makes a few thousand HTTP calls to a server that may be busy, restarting
or rate-limiting, so each call is retried with exponential backoff on what can pass (connection errors,
timeouts, 429, 5xx, a malformed 200) and gives the row up as None (an invalid row, never a crash) when
the retries run out. What no retry can fix (a wrong URL, model or key: any other non-2xx) raises
`JudgeBackendError` at once. Answers are cached on disk by content, so a re-run of an evaluation, or
of an interrupted one, asks only what it has not asked before.

The API key is read once from an environment variable and only ever sent as a header: it is kept out
of logs, errors, `identity()` and the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx
from tqdm import tqdm

log = logging.getLogger(__name__)


class JudgeBackendError(RuntimeError):
    """The endpoint refused a request in a way that retrying cannot fix."""


class _Transient(Exception):
    """A failure worth retrying; its message names the status or error type, never a header."""


class OpenAIChatBackend:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        concurrency: int = 8,
        temperature: float = 0.0,
        retry_temperature: float = 0.7,
        max_tokens: int = 512,
        cache_dir: str | Path | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        positive = {"timeout_s": timeout_s, "concurrency": concurrency, "max_tokens": max_tokens}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if max_retries < 0 or backoff_s < 0:
            raise ValueError(f"max_retries and backoff_s must be >= 0, got {max_retries} and {backoff_s}")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.url = f"{self.base_url}/chat/completions"
        self.api_key_env, self.timeout_s, self.concurrency = api_key_env, timeout_s, concurrency
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.temperature, self.retry_temperature, self.max_tokens = temperature, retry_temperature, max_tokens
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self._key:
            log.info("%s is not set: calling %s without an Authorization header", api_key_env, self.url)
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "failures": 0}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIChatBackend(base_url={self.base_url!r}, model={self.model!r})"

    def identity(self) -> dict:
        return {
            "backend": "openai",
            "base_url": self.base_url,
            "model": self.model,
            "temperature": self.temperature,
            "retry_temperature": self.retry_temperature,
            "max_tokens": self.max_tokens,
        }

    def complete(self, requests: list[list[dict[str, str]]], attempt: int = 0) -> list[str | None]:
        """Answers in the order of `requests`; a re-ask (`attempt` > 0) samples at `retry_temperature`
        with `seed=attempt`, so that even a deterministic server may answer differently."""
        payloads = [self._payload(messages, attempt) for messages in requests]
        keys = [self._cache_key(payload, attempt) for payload in payloads]
        answers = [self._cached(key) for key in keys]
        self._count("cache_hits", sum(answer is not None for answer in answers))
        missing = [i for i, answer in enumerate(answers) if answer is None]
        if not missing:
            return answers
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        with (
            httpx.Client(
                headers=headers, timeout=self.timeout_s, limits=httpx.Limits(max_connections=self.concurrency)
            ) as client,
            ThreadPoolExecutor(max_workers=self.concurrency) as pool,
        ):
            futures = {pool.submit(self._ask, client, payloads[i]): i for i in missing}
            try:
                for future in tqdm(as_completed(futures), total=len(futures), disable=len(futures) <= 50):
                    i = futures[future]
                    answers[i] = future.result()
                    if answers[i] is not None:
                        self._store(keys[i], answers[i])
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        return answers

    def _payload(self, messages: list[dict[str, str]], attempt: int) -> dict:
        temperature = self.retry_temperature if attempt > 0 else self.temperature
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": self.max_tokens,
        }
        return {**payload, "seed": attempt} if attempt > 0 else payload

    def _ask(self, client: httpx.Client, payload: dict) -> str | None:
        for retry in range(self.max_retries + 1):
            if retry:
                self._count("retries")
                delay = self.backoff_s * 2 ** (retry - 1)
                time.sleep(delay + random.uniform(0, delay / 10))
            try:
                return self._post(client, payload)
            except _Transient as error:
                failure = error
        self._count("failures")
        log.warning(
            "judge request to %s failed after %d retries (%s): the row is invalid",
            self.url,
            self.max_retries,
            failure,
        )
        return None

    def _post(self, client: httpx.Client, payload: dict) -> str:
        self._count("requests")
        try:
            response = client.post(self.url, json=payload)
        except httpx.TransportError as error:  # connection refused or reset, timeouts
            raise _Transient(type(error).__name__) from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}")
        if not 200 <= status < 300:
            hint = f"; check {self.api_key_env}" if status in (401, 403) and self.api_key_env else ""
            raise JudgeBackendError(f"{self.url} answered HTTP {status}{hint}: {self._redact(response.text)}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError):
            content = None
        if not isinstance(content, str):
            raise _Transient("HTTP 200 without choices[0].message.content")
        return content

    def _redact(self, text: str) -> str:
        """The server's error message, short, and without the key (some servers echo a wrong key)."""
        text = " ".join(text.split())
        return (text.replace(self._key, "***") if self._key else text)[:200]

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    def _cache_key(self, payload: dict, attempt: int) -> str:
        fields = {name: payload[name] for name in ("model", "messages", "temperature", "max_tokens")}
        # not the URL: the same model re-served on another host or port gives the same verdicts
        text = json.dumps({"attempt": attempt, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cached(self, key: str) -> str | None:
        if self.cache_dir is None:
            return None
        try:
            return json.loads(self._cache_path(key).read_text())["answer"]
        except (OSError, ValueError, KeyError):
            return None

    def _store(self, key: str, answer: str) -> None:
        """Write through a temporary file and `os.replace`, so concurrent runs never read half a file."""
        if self.cache_dir is None:
            return
        path = self._cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"answer": answer}, f)
        os.replace(temporary, path)

"""A reward computed by code, as params describe it: importable functions, each with a weight, and the
reward model or the gold scorer beside them; called safely.

Safety, since the functions are user code run inside the stage process (never in a flow's or a UI's:
the function paths are committed params, imported when the stage starts):
- each call has a deadline (`timeout_seconds`): SIGALRM in the main thread interrupts a function stuck in
  Python code or a sleep; elsewhere the call runs in a thread that is abandoned at the deadline;
- a call that raises, runs past its deadline, or returns a value that is not a finite number (or None)
  is repeated row by row to find the rows it fails on; then `on_error: raise` stops the stage with the
  function's name and the first such row, and `on_error: skip` leaves those rows out (None: no part of
  the sum, not in the mean) and counts them (`rewards/<name>/skipped`);
- a call that returns no list, or one of another length than the completions, is the function's own
  fault, not a row's: the stage stops, naming the function.
The reward model and the gold scorer (`rm`, `gold`) are the project's own models: called once, unguarded.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignment.rewards import functions as shipped
from alignment.rewards.combine import RewardBatch, Value, weighted_sum

logger = logging.getLogger(__name__)

MODEL_TERMS = ("rm", "gold")  # terms that are the project's reward model or gold scorer, not code
RESERVED = ("prompts", "completions", "completion_ids")  # the keyword arguments every function gets


class RewardFunctionError(RuntimeError):
    """A reward function that cannot be used: names the function and, when one is to blame, the row."""


class RewardTimeout(BaseException):
    """A call past its deadline. A BaseException, so that a function's own `except Exception` cannot
    swallow it and run on."""


def load_function(path: str) -> Callable:
    """`module:function` imported; a bare name is one of alignment/rewards/functions.py."""
    module_name, _, attribute = path.rpartition(":")
    try:
        module = importlib.import_module(module_name) if module_name else shipped
    except Exception as error:  # an import runs the module: any error is the module's
        raise RewardFunctionError(
            f"reward function {path!r}: cannot import {module_name!r}: {error}"
        ) from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RewardFunctionError(
            f"reward function {path!r}: {module.__name__} has no function {attribute!r}"
        )
    parameters = inspect.signature(function).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise RewardFunctionError(
            f"reward function {path!r} must accept **kwargs: it is called with prompts=, completions=, "
            "completion_ids= and every extra column of the data, as TRL calls reward functions"
        )
    return function


def call_with_timeout(call: Callable[[], Any], seconds: float) -> Any:
    """call(), or RewardTimeout once `seconds` have passed."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):

        def expire(signum, frame):
            raise RewardTimeout

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return call()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    # not the main thread (signals go there only): wait for a thread, and abandon it at the deadline
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = call()
        except BaseException as error:  # handed to the caller below
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise RewardTimeout
    if "error" in result:
        raise result["error"]
    return result["value"]


class _Failed(Exception):
    """One call of a reward function went wrong: `problem` says how; `shape`: not one value per
    completion, a fault of the function's, not of a row."""

    def __init__(self, problem: str, cause: BaseException | None = None, shape: bool = False):
        super().__init__(problem)
        self.problem, self.cause, self.shape = problem, cause, shape


def checked_values(output: Any, expected: int) -> list[Value]:
    """A function's output as one float or None per completion, or _Failed saying what is wrong."""
    if hasattr(output, "tolist"):  # a numpy array or a torch tensor
        output = output.tolist()
    if not isinstance(output, (list, tuple)):
        raise _Failed(
            f"returned {type(output).__name__}, not a list with one number (or None) per completion",
            shape=True,
        )
    if len(output) != expected:
        raise _Failed(f"returned {len(output)} values for {expected} completion(s)", shape=True)
    values: list[Value] = []
    for value in output:
        if value is None:
            values.append(None)
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            values.append(float(value))
        else:
            raise _Failed(f"returned {value!r} ({type(value).__name__}), not a finite number or None")
    return values


@dataclass(frozen=True)
class Term:
    """One term of the sum: a function of code (`call` set) or a model scorer (`model` set)."""

    name: str
    weight: float
    path: str  # as params name it
    call: Callable | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    model: Callable | None = None  # (prompts, responses, finished) -> scores


@dataclass
class Batch:
    """What every function of one scoring call sees."""

    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    finished: list[bool]
    columns: dict[str, list]  # each extra column of the prompts' rows, None where a row lacks it

    def __len__(self) -> int:
        return len(self.prompts)

    def describe(self, i: int) -> str:
        columns = getattr(self.prompts[i], "columns", {})
        ident = f"id {columns['id']!r}, " if "id" in columns else ""
        return f"row {i} of the batch ({ident}prompt ending {str(self.prompts[i])[-80:]!r})"


def prompt_columns(prompts: Sequence[str]) -> dict[str, list]:
    """Every extra column of the prompts' rows (`PromptRow.columns`), as one list per column."""
    names = list(dict.fromkeys(name for p in prompts for name in getattr(p, "columns", {})))
    return {name: [getattr(p, "columns", {}).get(name) for p in prompts] for name in names}


class RewardSource:
    """The weighted sum of `terms` on a batch of completions (`score`), and each function as a held-out
    judge (`judges`)."""

    def __init__(self, terms: list[Term], on_error: str = "raise", timeout_seconds: float = 10.0):
        self.terms, self.on_error, self.timeout_seconds = terms, on_error, timeout_seconds

    @classmethod
    def from_config(cls, cfg, models: dict[str, Callable] | None = None) -> RewardSource:
        """From a `rewards` params section (config.CodeRewardConfig): imports every function now, so a
        wrong path fails before any compute. `models` holds the scorers of the `rm` and `gold` terms."""
        models = models or {}
        terms = []
        for spec in cfg.functions:
            if spec.function in MODEL_TERMS:
                if spec.function not in models:
                    raise RewardFunctionError(f"reward term {spec.function!r}: no such scorer in this stage")
                terms.append(Term(spec.label, spec.weight, spec.function, model=models[spec.function]))
                continue
            clash = set(spec.kwargs) & set(RESERVED)
            if clash:
                raise RewardFunctionError(
                    f"reward function {spec.function!r}: kwargs {sorted(clash)} are reserved"
                )
            terms.append(
                Term(spec.label, spec.weight, spec.function, load_function(spec.function), dict(spec.kwargs))
            )
        return cls(terms, cfg.on_error, cfg.timeout_seconds)

    @property
    def code_terms(self) -> list[Term]:
        return [term for term in self.terms if term.model is None]

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        finished: Sequence[bool],
        only: Sequence[str] | None = None,
    ) -> RewardBatch:
        """Every term's values (or those named in `only`) and their weighted sum, per completion."""
        if not len(prompts) == len(completions) == len(completion_ids) == len(finished):
            raise ValueError(
                f"{len(prompts)} prompts, {len(completions)} completions, {len(completion_ids)} id lists, "
                f"{len(finished)} flags"
            )
        batch = Batch(
            list(prompts),
            list(completions),
            [list(ids) for ids in completion_ids],
            [bool(f) for f in finished],
            prompt_columns(prompts),
        )
        values, skipped = {}, {}
        for term in self.terms:
            if only is not None and term.name not in only:
                continue
            if term.model is not None:
                scores = term.model(batch.prompts, batch.completions, batch.finished)
                values[term.name] = [
                    float(s) for s in (scores.tolist() if hasattr(scores, "tolist") else scores)
                ]
                skipped[term.name] = [False] * len(batch)
            else:
                values[term.name], skipped[term.name] = self._function_values(term, batch)
        weights = {term.name: term.weight for term in self.terms}
        return RewardBatch(weighted_sum(values, weights), values, skipped)

    def _function_values(self, term: Term, batch: Batch) -> tuple[list[Value], list[bool]]:
        """The function on the whole batch; when that call fails, row by row, each failing row raised
        or skipped as `on_error` says."""
        clash = (set(batch.columns) & set(RESERVED)) | (set(batch.columns) & set(term.kwargs))
        if clash:
            raise RewardFunctionError(
                f"reward function {term.name!r} ({term.path}): the data's columns {sorted(clash)} clash with "
                f"its keyword arguments {sorted(RESERVED)} and kwargs {sorted(term.kwargs)}"
            )
        if not len(batch):
            return [], []
        try:
            return self._call(term, batch, range(len(batch))), [False] * len(batch)
        except _Failed as failure:
            if failure.shape:  # no row to blame or skip: the function itself is wrong
                raise RewardFunctionError(
                    f"reward function {term.name!r} ({term.path}) {failure.problem}"
                ) from None
            # else find the rows it fails on
        values, skipped, failures = [], [], []
        for i in range(len(batch)):
            try:
                values += self._call(term, batch, [i])
                skipped.append(False)
            except _Failed as failure:
                message = (
                    f"reward function {term.name!r} ({term.path}) failed on {batch.describe(i)}: "
                    + failure.problem
                )
                if self.on_error == "raise":
                    raise RewardFunctionError(
                        message + "; params `on_error: skip` would leave such rows out and count them"
                    ) from failure.cause
                values.append(None)
                skipped.append(True)
                failures.append(message)
        if failures:
            logger.warning("%d of %d rows skipped; the first: %s", len(failures), len(batch), failures[0])
        return values, skipped

    def _call(self, term: Term, batch: Batch, rows: Sequence[int]) -> list[Value]:
        arguments = {
            "prompts": [batch.prompts[i] for i in rows],
            "completions": [batch.completions[i] for i in rows],
            "completion_ids": [batch.completion_ids[i] for i in rows],
            **{name: [column[i] for i in rows] for name, column in batch.columns.items()},
            **term.kwargs,
        }
        try:
            output = call_with_timeout(lambda: term.call(**arguments), self.timeout_seconds)
        except RewardTimeout:
            raise _Failed(f"no answer within {self.timeout_seconds:g} s (timeout_seconds)") from None
        except Exception as error:
            raise _Failed(f"raised {type(error).__name__}: {error}", error) from error
        return checked_values(output, len(rows))

    def judges(self, tokenizer) -> dict[str, Callable]:
        """Held-out judges, each (prompts, responses, finished) -> one score per response (nan where a
        function gives None): every function of code by its name, and `code`, the weighted sum. A judge
        sees text: the ids are the response re-tokenized, EOS closing a finished one."""

        def ids(responses, finished) -> list[list[int]]:
            eos = [tokenizer.eos_token_id]
            return [
                tokenizer(r, add_special_tokens=False).input_ids + (eos if f else [])
                for r, f in zip(responses, finished)
            ]

        def judge(name: str | None) -> Callable:
            def scores(prompts, responses, finished) -> list[float]:
                batch = self.score(
                    prompts, responses, ids(responses, finished), finished, None if name is None else [name]
                )
                if name is None:
                    return batch.totals
                return [math.nan if v is None else v for v in batch.values[name]]

            return scores

        return {term.name: judge(term.name) for term in self.code_terms} | {"code": judge(None)}

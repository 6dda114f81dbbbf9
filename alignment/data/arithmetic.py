"""Arithmetic word problems generated from a seed: an embedded task whose answers a reward function can
check (alignment/rewards/functions.py `exact_match`, `answer_format`).

A problem starts from a number and applies `steps` operations (add, take away, double or triple), told
as a short story; the prompt asks for the answer in a fixed format, and the SFT response works it out
step by step before giving it in that format:

    Question: Ada has 7 apples. Ada buys 5 more. Ada gives away 3. How many apples does Ada have now?
    Give the answer as <answer>number</answer>.
    Answer: 7 + 5 = 12. 12 - 3 = 9. <answer>9</answer>

With `tagged_fraction` < 1 some worked answers close with "The answer is 9." instead: demonstrations
that ignore the asked format (as a mixed pool of annotators writes them), which SFT imitates and a
format reward can teach away. Each row also carries its `answer` (the number, as text) and an `id`:
the extra columns a reward computed by code receives. The same arguments always give the same problems.
"""

from __future__ import annotations

import random

NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kai", "Lea", "Max", "Nia")
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stickers", "shells", "cards")
ADD = ("{name} buys {n} more.", "{name} finds {n} more.", "A friend gives {name} {n} more.")
TAKE = ("{name} gives away {n}.", "{name} loses {n}.", "{name} sells {n}.")
TIMES = {2: "The {items} of {name} double.", 3: "The {items} of {name} triple."}
FORMAT = "Give the answer as <answer>number</answer>."


def problem(rng: random.Random, max_number: int, steps: int, tagged_fraction: float = 1.0) -> dict[str, str]:
    """One problem: {prompt, response, answer}; the response closes with the asked tag with probability
    `tagged_fraction`, else with "The answer is N." (a demonstration that ignores the asked format)."""
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(1, max_number)
    story, work = [f"{name} has {total} {items}."], []
    for _ in range(steps):
        kind = rng.choices(("add", "take", "times"), weights=(4, 4, 2))[0]
        if kind == "take" and total < 2:
            kind = "add"
        if kind == "times" and total > max_number:
            kind = "take"
        if kind == "add":
            n = rng.randint(1, max_number)
            story.append(rng.choice(ADD).format(name=name, n=n))
            work.append(f"{total} + {n} = {total + n}.")
            total += n
        elif kind == "take":
            n = rng.randint(1, total - 1)
            story.append(rng.choice(TAKE).format(name=name, n=n))
            work.append(f"{total} - {n} = {total - n}.")
            total -= n
        else:
            n = rng.choice((2, 3))
            story.append(TIMES[n].format(name=name, items=items))
            work.append(f"{total} * {n} = {total * n}.")
            total *= n
    question = f"How many {items} does {name} have now? {FORMAT}"
    close = f"<answer>{total}</answer>" if rng.random() < tagged_fraction else f"The answer is {total}."
    return {
        "prompt": f"Question: {' '.join(story)} {question}\nAnswer:",
        "response": f" {' '.join(work)} {close}",
        "answer": str(total),
    }


def generate(
    count: int, seed: int, max_number: int = 20, steps: int = 2, tagged_fraction: float = 1.0
) -> list[dict[str, str]]:
    """`count` distinct problems (by prompt), each with an `id` (its position) and an `answer`."""
    rng, rows, seen = random.Random(f"arithmetic-{seed}"), [], set()
    for _ in range(count * 50):  # distinct problems run out only for tiny max_number and steps
        row = problem(rng, max_number, steps, tagged_fraction)
        if row["prompt"] in seen:
            continue
        seen.add(row["prompt"])
        rows.append({"id": f"arith-{len(rows):05d}", **row})
        if len(rows) == count:
            return rows
    raise ValueError(f"only {len(rows)} distinct problems with max_number {max_number} and {steps} steps")

"""Programmatic reward of the tiny counting task: fraction of the requested numbers said in order."""

import re

WORDS = "zero one two three four five six seven eight nine ten".split()


def score(prompts: list[str], responses: list[str]) -> list[float]:
    out = []
    for p, r in zip(prompts, responses):
        m = re.search(r"count from (\w+) to (\w+)", p)
        if not m or m.group(1) not in WORDS or m.group(2) not in WORDS:
            out.append(0.0)
            continue
        want = WORDS[WORDS.index(m.group(1)):WORDS.index(m.group(2)) + 1]
        got = re.findall(r"[a-z]+", r.lower())
        hits = sum(1 for a, b in zip(want, got) if a == b)
        out.append(hits / len(want) - 0.1 * max(0, len(got) - len(want)))
    return out

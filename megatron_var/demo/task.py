"""The bundled synthetic instruction task of the CPU demo: prompts, candidate responses and a real reward.

Why synthetic: the demo must run with nothing downloaded and must show a *real* alignment effect. Each prompt
(e.g. "List 3 fruits.", "Name 2 colors in capital letters.", "Count from 4 to 7.") gets 4 candidate responses:
one fully correct, one off-topic, and two partially right ones (wrong count, wrong case, items of another
category, wrong separator, counting from the wrong start). Plain SFT on all of them learns that mixture; VAR
re-weights each sample by its reward against the other responses of its group and moves the model towards the
correct answers. ``reward`` parses the request back out of the prompt text (chat-templated, raw-templated or
bare) and checks the response's items, so it also scores cross pairs (x_i, y_j) and free generations.

Subsets (template names): ``list`` (lowercase comma list), ``upper`` (uppercase comma list), ``count``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum"),
    "colors": ("red", "blue", "green", "yellow", "black", "white", "pink", "brown", "purple", "gray"),
    "animals": ("cat", "dog", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf"),
}
PHRASINGS: dict[str, tuple[str, ...]] = {
    "list": ("List {n} {cat}.", "Name {n} {cat}.", "Give me {n} {cat}."),
    "upper": ("List {n} {cat} in uppercase.", "Name {n} {cat} in capital letters.", "Give me {n} {cat} in uppercase."),
    "count": ("Count from {a} to {b}.", "Count up from {a} to {b}.", "Write the numbers from {a} to {b}."),
}
SUBSETS = tuple(PHRASINGS)
LIST_COUNTS = (2, 3, 4)  # n items asked for
COUNT_STARTS = tuple(range(1, 10))  # a
COUNT_LENGTHS = (3, 4, 5)  # b - a + 1
OFF_TOPIC = (
    "I do not know.", "The weather is nice today.", "Let me think about it.", "That is a good question.",
    "I like to read books.", "Please ask me later.", "Sorry I cannot help.", "It depends on the day.",
)
# Flawed-but-related kinds per template; every prompt gets: correct, off_topic and two of these.
MIDDLE_KINDS = {
    "list": ("wrong_count", "wrong_case", "wrong_items", "wrong_format"),
    "upper": ("wrong_count", "wrong_case", "wrong_items", "wrong_format"),
    "count": ("wrong_count", "wrong_items", "wrong_format"),
}
HOLDOUT_FRACTION = 0.2  # share of distinct prompt strings reserved for test prompts (never in train.jsonl)

_CAT = "|".join(CATEGORIES)
_LIST_RE = re.compile(rf"\b(?:List|Name|Give me) (\d+) ({_CAT})( in uppercase| in capital letters)?\.")
_COUNT_RE = re.compile(r"\b(?:Count from|Count up from|Write the numbers from) (\d+) to (\d+)\.")
_STOP_MARKERS = ("</s>", "<|", "\n\n")  # decoded special tokens / next turn: the response ends there


@dataclass(frozen=True)
class Request:
    """What a prompt asks for, parsed back from its text."""

    subset: str  # list | upper | count
    n: int = 0  # list/upper: number of items
    category: str = ""  # list/upper
    start: int = 0  # count
    end: int = 0  # count

    def text(self, phrasing: int = 0) -> str:
        tmpl = PHRASINGS[self.subset][phrasing]
        return tmpl.format(n=self.n, cat=self.category, a=self.start, b=self.end)


def parse_request(prompt: str) -> Request:
    """The last task instruction found in ``prompt`` (bare, chat- or raw-templated, multi-turn).

    Raises ValueError for a prompt that is not from this task: scoring it would be meaningless.
    """
    best = None
    for m in _LIST_RE.finditer(prompt):
        req = Request("upper" if m.group(3) else "list", n=int(m.group(1)), category=m.group(2))
        best = (m.start(), req)
    for m in _COUNT_RE.finditer(prompt):
        if best is None or m.start() > best[0]:
            best = (m.start(), Request("count", start=int(m.group(1)), end=int(m.group(2))))
    if best is None:
        raise ValueError(f"demo reward: prompt is not a demo-task instruction: {prompt[-120:]!r}")
    return best[1]


def parse_items(response: str) -> tuple[list[str], bool]:
    """(items, comma_separated). A response without commas is split on whitespace (no format credit)."""
    text = response
    for marker in _STOP_MARKERS:
        text = text.split(marker, 1)[0]
    text = text.strip().rstrip(".").strip()
    if not text:
        return [], False
    if "," in text:
        return [it.strip().rstrip(".") for it in text.split(",") if it.strip()], True
    return text.split(), False


def score(req: Request, response: str) -> float:
    """Reward in [0, 1]: 1 only for exactly the requested items in the requested format.

    list/upper: 0.2 comma list + 0.2 right count + 0.4 distinct items of the category + 0.2 right case.
    count:      0.2 comma list + 0.2 right count + 0.6 numbers at the right positions.
    Partial credit is graded so that a response to a *similar* prompt (cross pair) beats an off-topic one.
    """
    items, comma = parse_items(response)
    if not items:
        return 0.0
    if req.subset == "count":
        want = [str(k) for k in range(req.start, req.end + 1)]
        denom = max(len(want), len(items))
        hits = sum(a == b for a, b in zip(items, want))
        return 0.2 * comma + 0.2 * (comma and len(items) == len(want)) + 0.6 * hits / denom
    vocab = set(CATEGORIES[req.category])
    denom = max(req.n, len(items))
    good = {it.lower() for it in items if it.lower() in vocab}
    cased = {it for it in items if it.lower() in vocab and (it.isupper() if req.subset == "upper" else it.islower())}
    return (0.2 * comma + 0.2 * (comma and len(items) == req.n) + 0.4 * min(len(good), req.n) / denom
            + 0.2 * min(len(cased), req.n) / denom)


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The ``--reward-fn`` entry point (score_rewards, eval_reward): one float in [0, 1] per (prompt, response)."""
    if len(prompts) != len(responses):
        raise ValueError(f"demo reward: {len(prompts)} prompts but {len(responses)} responses")
    cache: dict[str, Request] = {}
    out = []
    for p, r in zip(prompts, responses):
        if p not in cache:
            cache[p] = parse_request(p)
        out.append(float(score(cache[p], r)))
    return out


# ---------------------------------------------------------------- generation of prompts and candidates


def all_requests() -> list[tuple[Request, int]]:
    """Every (request, phrasing index) of the task, in a fixed order."""
    out = []
    for subset in ("list", "upper"):
        for cat in CATEGORIES:
            for n in LIST_COUNTS:
                out += [(Request(subset, n=n, category=cat), k) for k in range(len(PHRASINGS[subset]))]
    for a in COUNT_STARTS:
        for length in COUNT_LENGTHS:
            out += [(Request("count", start=a, end=a + length - 1), k) for k in range(len(PHRASINGS["count"]))]
    return out


def split_requests(seed: int) -> dict[str, list[tuple[Request, int]]]:
    """Disjoint train/test prompt strings, per subset: test prompts are never seen verbatim in training."""
    rng = random.Random(f"split-{seed}")
    out: dict[str, list] = {"train": [], "test": []}
    for subset in SUBSETS:
        pool = [rp for rp in all_requests() if rp[0].subset == subset]
        rng.shuffle(pool)
        k = max(1, round(HOLDOUT_FRACTION * len(pool)))
        out["test"] += pool[:k]
        out["train"] += pool[k:]
    return out


def _case(words: list[str], upper: bool) -> list[str]:
    return [w.upper() if upper else w for w in words]


def candidate(req: Request, kind: str, rng: random.Random) -> str:
    """One response of the given quality kind for ``req``."""
    if kind == "off_topic":
        return rng.choice(OFF_TOPIC)
    if req.subset == "count":
        nums = list(range(req.start, req.end + 1))
        if kind == "wrong_count":
            nums = nums[:-1] if rng.random() < 0.5 else nums + [req.end + 1]
        elif kind == "wrong_items":
            nums = [k + 1 for k in nums]
        sep = " " if kind == "wrong_format" else ", "
        return sep.join(map(str, nums))
    upper = req.subset == "upper"
    vocab = CATEGORIES[req.category]
    n = req.n
    if kind == "wrong_count":
        n = req.n - 1 if rng.random() < 0.5 else req.n + 1
    if kind == "wrong_items":
        vocab = CATEGORIES[rng.choice([c for c in CATEGORIES if c != req.category])]
    if kind == "wrong_case":
        upper = not upper
    words = _case(rng.sample(vocab, n), upper)
    return (" " if kind == "wrong_format" else ", ").join(words)


def candidates(req: Request, rng: random.Random) -> list[tuple[str, str]]:
    """[(kind, text)] of the 4 candidates of one prompt, sorted by reward (best first)."""
    kinds = ["correct", "off_topic", *rng.sample(MIDDLE_KINDS[req.subset], 2)]
    out = [(kind, candidate(req, kind, rng)) for kind in kinds]
    return sorted(out, key=lambda kt: -score(req, kt[1]))


def train_rows(n_prompts: int, seed: int) -> list[dict]:
    """2 rows per prompt: (best, 3rd) and (2nd, worst), so ``--responses all`` sees all 4 candidates and
    ``--responses pairs`` gets 2 strictly ordered DPO pairs (correct > middle, middle > off-topic)."""
    pool = split_requests(seed)["train"]
    rng = random.Random(f"train-{seed}")
    rows = []
    for _ in range(n_prompts):
        req, phrasing = rng.choice(pool)
        prompt = req.text(phrasing)
        (_, c0), (_, c1), (_, c2), (_, c3) = candidates(req, rng)
        rows.append({"prompt": prompt, "response": c0, "rejected": c2, "subset": req.subset})
        rows.append({"prompt": prompt, "response": c1, "rejected": c3, "subset": req.subset})
    return rows


def make_test_prompts(n: int, seed: int) -> list[dict]:
    """``n`` held-out prompts, balanced over subsets, cycling through the held-out strings in a seeded order."""
    held = split_requests(seed)["test"]
    rng = random.Random(f"test-{seed}")
    per_subset = {s: [rp for rp in held if rp[0].subset == s] for s in SUBSETS}
    for pool in per_subset.values():
        rng.shuffle(pool)
    out = []
    for k in range(n):
        subset = SUBSETS[k % len(SUBSETS)]
        pool = per_subset[subset]
        req, phrasing = pool[(k // len(SUBSETS)) % len(pool)]
        out.append({"prompt": req.text(phrasing), "subset": subset})
    return out


def corpus_texts() -> list[str]:
    """Every prompt string and a sample of every response kind: the text the demo tokenizer is trained on."""
    rng = random.Random("corpus")
    texts = []
    for req, phrasing in all_requests():
        texts.append(req.text(phrasing))
        kinds = ["correct", "off_topic", *MIDDLE_KINDS[req.subset]]
        texts += [candidate(req, kind, rng) for kind in kinds]
    return texts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_dataset(out_dir: str | Path, n_train: int, n_test: int, seed: int) -> dict[str, Path]:
    """Write ``train.jsonl`` (plain {prompt, response, rejected, subset}; 2 rows per prompt, so ``n_train``
    prompts -> 4*n_train samples with ``--responses all``, 2*n_train pairs with ``--responses pairs``) and
    ``test_prompts.jsonl`` ({prompt, subset}, prompts held out of training). Deterministic in ``seed``."""
    if n_train < 1 or n_test < 1:
        raise ValueError(f"write_dataset: n_train ({n_train}) and n_test ({n_test}) must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "test": out / "test_prompts.jsonl"}
    _write_jsonl(paths["train"], train_rows(n_train, seed))
    _write_jsonl(paths["test"], make_test_prompts(n_test, seed))
    return paths

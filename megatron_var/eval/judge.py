"""Asking an LLM judge through any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API).

HTTP failures (connection errors, timeouts, 408/409/429/5xx) are retried by the ``openai`` client itself
(``max_retries``, exponential backoff or the server's Retry-After). A reply that arrives but cannot be used — a
body that is not a chat completion, or text without a verdict tag — is re-asked up to ``verdict_retries`` times
and then recorded as an error (never as a tie). Successful judgments are appended to a JSONL cache keyed by
(judge model, prompt template, question, answer A, answer B, order), so an interrupted or repeated run re-asks
nothing it already has. Requests run concurrently in a thread pool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from megatron_var.eval.winrate import TEMPLATE_ID, judge_messages, parse_verdict

logger = logging.getLogger(__name__)


@dataclass
class JudgeConfig:
    base_url: str  # e.g. http://host:8000/v1
    model: str  # the judge model name the server knows
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (local servers accept any)
    concurrency: int = 8
    max_retries: int = 5  # HTTP-level retries per request (openai client)
    verdict_retries: int = 2  # extra asks when a reply has no usable verdict
    timeout: float = 120.0  # seconds per request
    temperature: float = 0.0
    max_tokens: int = 2048
    progress: bool = True

    def __post_init__(self):
        checks = [
            (self.base_url.startswith(("http://", "https://")), f"--judge-base-url {self.base_url!r}: need http(s)://"),
            (bool(self.model), "--judge-model must not be empty"),
            (self.concurrency >= 1, "--concurrency must be >= 1"),
            (self.max_retries >= 0 and self.verdict_retries >= 0, "--max-retries / --verdict-retries must be >= 0"),
            (self.timeout > 0, "--timeout must be > 0"),
            (self.max_tokens >= 1, "--judge-max-tokens must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass(frozen=True)
class Request:
    """One judgment to obtain: the question with answers in positions A and B; order says which is the model's."""

    question: str
    answer_a: str
    answer_b: str
    order: str  # "model_first" (model is A) or "reference_first" (model is B)

    def key(self, judge_model: str) -> str:
        fields = [judge_model, TEMPLATE_ID, self.question, self.answer_a, self.answer_b, self.order]
        return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()


class JudgmentCache:
    """Append-only JSONL of successful judgments: {"key", "verdict", "reply"}; thread-safe appends."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path and self.path.is_file():
            self._load()

    def _load(self) -> None:
        bad = 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    self.entries[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    bad += 1  # e.g. a line cut by an interrupted run: that judgment is simply asked again
        if bad:
            logger.warning("%s: %d unreadable cache lines ignored (their judgments will be asked again)", self.path, bad)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, verdict: str, reply: str) -> None:
        rec = {"key": key, "verdict": verdict, "reply": reply}
        with self._lock:
            self.entries[key] = rec
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()


@dataclass
class JudgeStats:
    requests: int = 0  # HTTP chat-completion calls that returned (successful or not usable)
    cache_hits: int = 0
    unusable_replies: int = 0  # replies re-asked: no verdict tag, or not a chat completion
    errors: int = 0  # judgments still without a verdict after all retries
    seconds: float = 0.0


class Judge:
    def __init__(self, cfg: JudgeConfig, cache: JudgmentCache):
        try:
            import openai
        except ImportError:
            raise ValueError("the LLM judge needs the openai package: pip install openai") from None
        self.openai = openai
        self.cfg, self.cache, self.stats = cfg, cache, JudgeStats()
        self._lock = threading.Lock()
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
                                    max_retries=cfg.max_retries, timeout=cfg.timeout)

    def _ask_once(self, req: Request) -> tuple[str | None, str]:
        """(verdict or None, reply text or error description) of one chat completion."""
        try:
            resp = self.client.chat.completions.create(
                model=self.cfg.model, messages=judge_messages(req.question, req.answer_a, req.answer_b),
                temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens)
            reply = resp.choices[0].message.content
        except (self.openai.BadRequestError, self.openai.UnprocessableEntityError) as e:
            # this request only (e.g. longer than the judge's context): an error for this pair, not for the run
            with self._lock:
                self.stats.requests += 1
            return None, f"request rejected ({type(e).__name__}: {e})"
        except (self.openai.APIStatusError, self.openai.APIConnectionError) as e:
            raise JudgeUnavailable(f"judge request failed after {self.cfg.max_retries} retries: "
                                   f"{type(e).__name__}: {e}") from None
        except Exception as e:  # a 200 whose body is not a chat completion (bad JSON, missing fields)
            with self._lock:
                self.stats.requests += 1
            return None, f"unusable response ({type(e).__name__}: {e})"
        with self._lock:
            self.stats.requests += 1
        return parse_verdict(reply), reply if isinstance(reply, str) else repr(reply)

    def judge(self, req: Request) -> str | None:
        """Verdict ("A", "B", "tie") of one request, from the cache or the judge; None after all retries."""
        key = req.key(self.cfg.model)
        hit = self.cache.get(key)
        if hit is not None:
            with self._lock:
                self.stats.cache_hits += 1
            return hit["verdict"]
        last = ""
        for _ in range(1 + self.cfg.verdict_retries):
            verdict, last = self._ask_once(req)
            if verdict is not None:
                self.cache.put(key, verdict, last)
                return verdict
            with self._lock:
                self.stats.unusable_replies += 1
        logger.warning("judge gave no verdict after %d asks; counted as an error. Last reply: %.200r",
                       1 + self.cfg.verdict_retries, last)
        with self._lock:
            self.stats.errors += 1
        return None

    def judge_all(self, requests: list[Request]) -> dict[Request, str | None]:
        """Verdicts of distinct requests, concurrently, with a progress bar (rate and ETA)."""
        t0 = time.perf_counter()
        unique = list(dict.fromkeys(requests))
        out: dict[Request, str | None] = {}
        bar = tqdm(total=len(unique), desc="judge", unit="judgment", dynamic_ncols=True,
                   disable=None if self.cfg.progress else True)
        with bar, ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            futures = {pool.submit(self.judge, r): r for r in unique}
            try:
                for fut in as_completed(futures):
                    out[futures[fut]] = fut.result()
                    bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        self.stats.seconds = time.perf_counter() - t0
        return out


class JudgeUnavailable(ValueError):
    """The endpoint keeps failing at the HTTP level (down, wrong URL, key or model): stop, keep the cache."""

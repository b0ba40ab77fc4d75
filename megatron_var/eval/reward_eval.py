"""eval_reward: sample responses from HF models on a prompt set and score them (reward model or function).

Protocol (VAR paper): temperature 0.8, top-p 0.9, top-k 50; each model is sampled once per seed over the whole
prompt set; the reported number is the mean over seeds of the per-seed mean reward, with the standard error of
those per-seed means (std with ddof=1 / sqrt(#seeds)) — also per subset. Prompts are rendered exactly like
prepare_data renders training prompts (the same Formatter), so a model is evaluated in the format it was trained in.

Prompts keep the whole conversation: an HH-RLHF dialogue is cut before its last assistant reply (that reply is
kept as the reference answer for the win rate, tools/eval_winrate.py) and rendered as messages.

Determinism and data parallelism (torchrun, --engine transformers|vllm): see generation.py. With the
transformers engine, batch k of seed s is sampled right after ``torch.manual_seed(s * 1_000_003 + k)``, so the
same model, prompts, --batch-size and seed give the same generations whatever the number of ranks.
"""

from __future__ import annotations

import gc
import gzip
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_var.data.adapters import BadRow, parse_hh
from megatron_var.data.formatting import DEFAULT_RAW_TEMPLATE, Formatter, TemplateConfig
from megatron_var.data.readers import InputSource
from megatron_var.eval.generation import (ENGINES, DistContext, VLLMEngine, fit_prompts, generation_config, load_policy,
                                     rank_batches, resolve_engine, sample_batch, seed_for)
from megatron_var.eval.stats import mean_se

logger = logging.getLogger(__name__)

_SPLIT_NAMES = {"train", "test", "valid", "validation", "eval", "dev"}


@dataclass
class EvalConfig:
    """What eval_reward needs; mirrors the CLI flags. Exactly one of reward_model / reward_fn."""

    models: list[str]  # local HF model dirs
    prompts: list[str]  # prompt files (JSONL[.gz], JSON, Parquet, CSV, save_to_disk dir)
    names: list[str] | None = None  # labels of the models (default: the directory names)
    reward_model: str | None = None  # HF AutoModelForSequenceClassification dir
    reward_fn: str | None = None  # module:function or path/to/file.py:function
    template: str = "chat"  # chat: tokenizer.apply_chat_template; raw: raw_template
    raw_template: str = DEFAULT_RAW_TEMPLATE
    system_prompt: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 128
    batch_size: int = 16  # prompts per generate() call
    max_prompts: int | None = None  # use only the first N prompts
    rm_batch_size: int = 16
    rm_max_length: int = 4096
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str | None = None
    engine: str = "auto"  # auto | transformers | vllm (see generation.py)
    tensor_parallel_size: int | None = None  # vLLM only; default: every visible GPU
    progress: bool = True

    def __post_init__(self):
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError("pass exactly one of --reward-model or --reward-fn")
        if not self.models:
            raise ValueError("--model needs at least one HF model directory")
        if self.names is not None and len(self.names) != len(self.models):
            raise ValueError(f"--names has {len(self.names)} labels for {len(self.models)} --model dirs")
        labels = self.labels()
        if len(set(labels)) != len(labels):
            raise ValueError(f"model labels must be unique, got {labels}; pass --names")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be non-empty and distinct, got {self.seeds}")
        checks = [
            (self.temperature > 0, "--temperature must be > 0"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.top_k >= 0, "--top-k must be >= 0"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
            (self.batch_size >= 1 and self.rm_batch_size >= 1, "--batch-size / --rm-batch-size must be >= 1"),
            (self.max_prompts is None or self.max_prompts >= 1, "--max-prompts must be >= 1"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), "--dtype: auto|float32|bfloat16|float16"),
            (self.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}"),
            (self.tensor_parallel_size is None or self.tensor_parallel_size >= 1, "--tensor-parallel-size >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        for path in self.models:
            if not Path(path).is_dir():
                raise ValueError(f"--model {path}: not a directory (need a local HF model)")
        for path in self.prompts:
            if not Path(path).exists():
                raise ValueError(f"--prompts {path}: no such file or directory")
        TemplateConfig(self.template, self.raw_template, self.system_prompt)

    def labels(self) -> list[str]:
        return list(self.names) if self.names else [Path(m).resolve().name for m in self.models]


@dataclass
class PromptItem:
    messages: list[dict]  # prompt turns (no assistant answer at the end)
    subset: str
    where: str  # file:line, for error messages
    reference: str | None = None  # the data set's answer (HH: chosen), the win-rate baseline


# ----------------------------------------------------------------------------------------------- prompts


def _rows(path: Path):
    """(where, row) of one prompt file; .jsonl.gz read here (HH-RLHF ships gzipped JSONL)."""
    if path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    where = f"{path}:{lineno}"
                    try:
                        yield where, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None
        return
    yield from InputSource(path)


def _check_turns(msgs, where: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {k} needs string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def parse_prompt_row(row: dict, where: str) -> tuple[list[dict], str | None]:
    """(prompt turns, reference answer or None) of one row.

    ``prompt`` (+ optional ``system``; reference from a string ``chosen`` or ``response``), chat ``messages`` (a
    trailing assistant turn is the reference), or an HH-RLHF ``chosen`` dialogue: the prompt is the whole
    conversation before the last assistant reply, which is the reference (the paper's win-rate baseline)."""
    reference = None
    if isinstance(row.get("prompt"), str):
        msgs = [{"role": "user", "content": row["prompt"]}]
        if isinstance(row.get("system"), str) and row["system"].strip():
            msgs.insert(0, {"role": "system", "content": row["system"]})
        reference = next((row[k] for k in ("chosen", "response") if isinstance(row.get(k), str)), None)
    elif "messages" in row:
        msgs = _check_turns(row["messages"], where)
        msgs, reference = _split_reference(msgs)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
    elif "chosen" in row:
        turns = parse_hh(row["chosen"], where) if isinstance(row["chosen"], str) else _check_turns(row["chosen"], where)
        msgs, reference = _split_reference(turns)
    else:
        raise ValueError(f"{where}: a prompt row needs 'prompt', 'messages' or an HH-style 'chosen' field "
                         f"(got {sorted(row)})")
    if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
        raise ValueError(f"{where}: empty prompt (no non-empty user turn)")
    return msgs, reference


def _split_reference(turns: list[dict]) -> tuple[list[dict], str | None]:
    """A dialogue ending with an assistant turn -> (turns before it, its text); otherwise (turns, None)."""
    if turns and turns[-1]["role"] == "assistant":
        return turns[:-1], turns[-1]["content"]
    return turns, None


def row_messages(row: dict, where: str) -> list[dict]:
    return parse_prompt_row(row, where)[0]


def default_subset(path: Path) -> str:
    """Subset of rows without a ``subset`` field: the file stem, or its folder for split-named files
    (``helpful-base/test.jsonl.gz`` -> ``helpful-base``)."""
    stem = path.name.split(".")[0]
    return path.parent.name if stem in _SPLIT_NAMES and path.parent.name else stem


def load_prompts(paths: list[str], max_prompts: int | None = None) -> list[PromptItem]:
    items = []
    for p in paths:
        path = Path(p)
        fallback = default_subset(path)
        for where, row in _rows(path):
            if isinstance(row, BadRow):
                raise ValueError(str(row))
            subset = row.get("subset")
            msgs, reference = parse_prompt_row(row, where)
            items.append(PromptItem(msgs, str(subset) if subset else fallback, where, reference))
            if max_prompts and len(items) >= max_prompts:
                return items
    if not items:
        raise ValueError(f"--prompts {' '.join(paths)}: no prompts found")
    return items


# -------------------------------------------------------------------------------------------- generation


@dataclass
class ModelGenerations:
    """What one rank sampled from one model: texts[s][k] is the response to prompt indices[k] under seeds[s]
    (after merge_ranks: every prompt, indices == range(N))."""

    name: str
    path: str
    prompt_texts: list[str]  # all prompts, rendered
    prompt_messages: list[list[dict]]  # as rendered (system prompt included), for reward models' own templates
    indices: list[int]
    texts: list[list[str]]
    num_tokens: list[list[int]]
    finished: list[list[bool]]
    seconds: float


def _render(tok, items: list[PromptItem], cfg: EvalConfig) -> tuple[list[list[dict]], list[str], list[list[int]]]:
    """(messages, prompt texts, prompt ids) rendered like prepare_data renders training prompts."""
    fmt = Formatter(tok, TemplateConfig(cfg.template, cfg.raw_template, cfg.system_prompt))
    messages = [fmt.prompt_messages(_as_example(it)) for it in items]
    prompt_texts = [fmt.prompt_text(m, it.where) for m, it in zip(messages, items)]
    return messages, prompt_texts, [x.tolist() for x in fmt.encode_prompts(prompt_texts)]


def generate(path: str, name: str, items: list[PromptItem], cfg: EvalConfig,
             ctx: DistContext | None = None) -> ModelGenerations:
    """This rank's share of the generations of one model (all of them with one process or vLLM)."""
    ctx = ctx or DistContext()
    if resolve_engine(cfg.engine, ctx.world_size) == "vllm":
        return _generate_vllm(path, name, items, cfg)
    model, tok, dev = load_policy(path, cfg.dtype, cfg.device)
    messages, prompt_texts, prompt_ids = _render(tok, items, cfg)
    prompt_ids = fit_prompts(prompt_ids, model, cfg.max_new_tokens, path)
    gen_cfg = generation_config(model, tok, cfg)
    batches = rank_batches(len(items), cfg.batch_size, ctx.rank, ctx.world_size)
    indices = [i for _, start, end in batches for i in range(start, end)]
    gens = ModelGenerations(name, str(path), prompt_texts, messages, indices, [], [], [], 0.0)
    t0, n_tokens = time.perf_counter(), 0
    desc = f"generate {name}" + (f" (rank 0 of {ctx.world_size})" if ctx.world_size > 1 else "")
    bar = tqdm(total=len(indices) * len(cfg.seeds), desc=desc, unit="prompt", dynamic_ncols=True,
               disable=None if (cfg.progress and ctx.rank == 0) else True)
    with bar:
        for seed in cfg.seeds:
            texts, lens, done = [], [], []
            for k, start, end in batches:
                torch.manual_seed(seed_for(seed, k))
                for ids, ended in sample_batch(model, prompt_ids[start:end], gen_cfg, dev):
                    texts.append(tok.decode(ids, skip_special_tokens=True))
                    lens.append(len(ids))
                    done.append(ended)
                    n_tokens += len(ids)
                bar.update(end - start)
                bar.set_postfix(tok_per_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
            gens.texts.append(texts)
            gens.num_tokens.append(lens)
            gens.finished.append(done)
    gens.seconds = time.perf_counter() - t0
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return gens


def _generate_vllm(path: str, name: str, items: list[PromptItem], cfg: EvalConfig) -> ModelGenerations:
    from transformers import AutoTokenizer

    engine = VLLMEngine(path, cfg, cfg.tensor_parallel_size)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    messages, prompt_texts, prompt_ids = _render(tok, items, cfg)
    indices = list(range(len(items)))
    gens = ModelGenerations(name, str(path), prompt_texts, messages, indices, [], [], [], 0.0)
    t0 = time.perf_counter()
    for seed in cfg.seeds:
        out = engine.generate(prompt_ids, indices, seed)
        gens.texts.append([tok.decode(ids, skip_special_tokens=True) for ids, _ in out])
        gens.num_tokens.append([len(ids) for ids, _ in out])
        gens.finished.append([ended for _, ended in out])
    gens.seconds = time.perf_counter() - t0
    engine.close()
    gc.collect()
    return gens


def merge_ranks(shares: list[ModelGenerations], n: int) -> ModelGenerations:
    """The ranks' shares of one model in prompt order; every prompt exactly once (else a bug, not user input)."""
    first = shares[0]
    order = [(i, r, k) for r, g in enumerate(shares) for k, i in enumerate(g.indices)]
    order.sort()
    if [i for i, _, _ in order] != list(range(n)):
        raise RuntimeError(f"ranks returned prompts {sorted(i for i, _, _ in order)[:10]}..., expected 0..{n - 1}")

    def pick(field_name: str) -> list[list]:
        per_rank = [getattr(g, field_name) for g in shares]
        return [[per_rank[r][s][k] for _, r, k in order] for s in range(len(first.texts))]

    return ModelGenerations(first.name, first.path, first.prompt_texts, first.prompt_messages, list(range(n)),
                            pick("texts"), pick("num_tokens"), pick("finished"), max(g.seconds for g in shares))


def _as_example(item: PromptItem):
    from megatron_var.data.adapters import Example

    return Example(item.messages, [], where=item.where)


# ------------------------------------------------------------------------------------------- statistics


def summarize(rewards_SN: np.ndarray, subsets: list[str]) -> dict:
    """rewards_SN[s, i]: reward of prompt i under seed s -> overall and per-subset mean/SE/per-seed means."""
    def block(mask: np.ndarray) -> dict:
        per_seed = rewards_SN[:, mask].mean(axis=1).tolist()
        mean, se = mean_se(per_seed)
        return {"mean": mean, "se": se, "per_seed": per_seed, "n_prompts": int(mask.sum())}

    subsets_arr = np.asarray(subsets)
    out = block(np.ones(len(subsets), dtype=bool))
    out["subsets"] = {s: block(subsets_arr == s) for s in sorted(set(subsets))}
    return out


def make_scorer(cfg: EvalConfig):
    from megatron_var.data.reward_scorers import FunctionScorer, HFRewardModel

    if cfg.reward_fn is not None:
        return FunctionScorer(cfg.reward_fn)
    return HFRewardModel(cfg.reward_model, cfg.rm_batch_size, cfg.rm_max_length, cfg.dtype, cfg.device)


def score_generations(scorer, gens: ModelGenerations, items: list[PromptItem], cfg: EvalConfig) -> np.ndarray:
    """[S, K] rewards of the K generations in gens.indices; non-finite scores are an error (they would poison
    the mean)."""
    S, K = len(gens.texts), len(gens.indices)
    p_txt = [gens.prompt_texts[i] for i in gens.indices] * S
    p_msg = [gens.prompt_messages[i] for i in gens.indices] * S
    flat = scorer(p_txt, p_msg, [t for texts in gens.texts for t in texts]) if K else []
    rewards_SK = np.asarray(flat, dtype=np.float64).reshape(S, K)
    if not np.isfinite(rewards_SK).all():
        s, k = np.argwhere(~np.isfinite(rewards_SK))[0].tolist()
        raise ValueError(f"scorer returned {rewards_SK[s, k]} for model {gens.name}, seed {cfg.seeds[s]}, "
                         f"prompt {items[gens.indices[k]].where}")
    return rewards_SK


def evaluate(cfg: EvalConfig) -> dict | None:
    """Generate with every model, then score everything with one scorer (loaded once, after generation, so a
    large policy and a large reward model never share the GPU). Under torchrun every rank generates and scores
    its share; rank 0 returns the results dict written as JSON, the other ranks None."""
    ctx = DistContext.from_env()
    try:
        return _evaluate(cfg, ctx)
    finally:
        ctx.close()


def _evaluate(cfg: EvalConfig, ctx: DistContext) -> dict | None:
    if not cfg.progress or ctx.rank != 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars
    engine = cfg.engine = resolve_engine(cfg.engine, ctx.world_size)  # the report records the one used
    items = load_prompts(cfg.prompts, cfg.max_prompts)
    subsets = [it.subset for it in items]
    if ctx.rank == 0:
        logger.info("%d prompts (%s), engine %s, %d rank(s)", len(items), dict(Counter(subsets)), engine,
                    ctx.world_size)
    local = [generate(path, name, items, cfg, ctx) for path, name in zip(cfg.models, cfg.labels())]
    scorer = make_scorer(cfg)
    local_rewards = [score_generations(scorer, g, items, cfg) for g in local]
    gathered = ctx.gather((local, local_rewards))
    if gathered is None:
        return None
    results, generations = [], []
    for m in range(len(local)):
        gens = merge_ranks([share[0][m] for share in gathered], len(items))
        rewards_SN = np.zeros((len(cfg.seeds), len(items)))
        for share_gens, share_rewards in ((share[0][m], share[1][m]) for share in gathered):
            rewards_SN[:, share_gens.indices] = share_rewards
        tokens = np.asarray(gens.num_tokens, dtype=np.float64)
        res = {"name": gens.name, "path": gens.path, **summarize(rewards_SN, subsets),
               "response_tokens_mean": float(tokens.mean()), "eos_rate": float(np.mean(gens.finished)),
               "generate_seconds": gens.seconds}
        results.append(res)
        for s, seed in enumerate(cfg.seeds):
            for i, it in enumerate(items):
                generations.append({"model": gens.name, "seed": seed, "index": i, "subset": it.subset,
                                    "prompt": gens.prompt_texts[i], "messages": gens.prompt_messages[i],
                                    "response": gens.texts[s][i], "reference": it.reference,
                                    "reward": float(rewards_SN[s, i]), "tokens": gens.num_tokens[s][i],
                                    "finished": gens.finished[s][i]})
    config = {k: v for k, v in vars(cfg).items() if k != "progress"}
    return {"config": config, "scorer": scorer.identity, "n_prompts": len(items), "world_size": ctx.world_size,
            "subsets": dict(Counter(subsets)), "results": results, "generations": generations}

"""eval_reward: sample responses from HF models on a prompt set and score them (reward model or function).

Protocol (VAR paper): temperature 0.8, top-p 0.9, top-k 50; each model is sampled once per seed over the whole
prompt set; the reported number is the mean over seeds of the per-seed mean reward, with the standard error of
those per-seed means (std with ddof=1 / sqrt(#seeds)) — also per subset. Prompts are rendered exactly like
prepare_data renders training prompts (the same Formatter), so a model is evaluated in the format it was trained in.

Determinism: batch k of seed s is sampled right after ``torch.manual_seed(s * 1_000_003 + k)``, so the same
model, prompts, --batch-size and seed give the same generations whatever else ran before.
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
from megatron_var.stats import mean_se

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


def row_messages(row: dict, where: str) -> list[dict]:
    """Prompt turns of one row: ``prompt`` (+ optional ``system``), chat ``messages`` (a trailing assistant turn
    is dropped: it is the reference answer), or an HH-RLHF ``chosen`` dialogue (its first human turn)."""
    if isinstance(row.get("prompt"), str):
        msgs = [{"role": "user", "content": row["prompt"]}]
        if isinstance(row.get("system"), str) and row["system"].strip():
            msgs.insert(0, {"role": "system", "content": row["system"]})
    elif "messages" in row:
        msgs = _check_turns(row["messages"], where)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
    elif "chosen" in row:
        turns = parse_hh(row["chosen"], where) if isinstance(row["chosen"], str) else _check_turns(row["chosen"], where)
        first_user = next((m for m in turns if m["role"] == "user"), None)
        msgs = [first_user] if first_user else []
    else:
        raise ValueError(f"{where}: a prompt row needs 'prompt', 'messages' or an HH-style 'chosen' field "
                         f"(got {sorted(row)})")
    if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
        raise ValueError(f"{where}: empty prompt (no non-empty user turn)")
    return msgs


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
            items.append(PromptItem(row_messages(row, where), str(subset) if subset else fallback, where))
            if max_prompts and len(items) >= max_prompts:
                return items
    if not items:
        raise ValueError(f"--prompts {' '.join(paths)}: no prompts found")
    return items


# -------------------------------------------------------------------------------------------- generation


def seed_for(seed: int, batch_index: int) -> int:
    return seed * 1_000_003 + batch_index


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_policy(path: str, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer, device) of a local HF causal LM, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_var.data.scorers import pick_device

    dev = pick_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_resolve_dtype(dtype, dev), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {path}: cannot load ({type(e).__name__}: {e})") from None
    if tok.eos_token_id is None:
        raise ValueError(f"--model {path}: tokenizer has no eos token; generation could not stop")
    return model.to(dev).eval(), tok, dev


def generation_config(model, tok, cfg: EvalConfig):
    """The paper's sampling, nothing else from the checkpoint except its stop tokens."""
    from transformers import GenerationConfig

    eos = getattr(model.generation_config, "eos_token_id", None) or tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            max_new_tokens=cfg.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                            bos_token_id=tok.bos_token_id)


@torch.inference_mode()
def sample_batch(model, prompt_ids: list[list[int]], gen_cfg, device) -> list[tuple[list[int], bool]]:
    """Left-padded batch generation; returns per prompt (response ids without eos, ended with eos)."""
    pad = gen_cfg.pad_token_id
    width = max(len(p) for p in prompt_ids)
    ids_NT = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    mask_NT = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        ids_NT[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask_NT[row, width - len(p):] = 1
    out = model.generate(input_ids=ids_NT.to(device), attention_mask=mask_NT.to(device), generation_config=gen_cfg)
    eos = gen_cfg.eos_token_id
    eos_set = set(eos) if isinstance(eos, list) else {eos}
    results = []
    for row in out[:, width:].tolist():
        cut = next((k for k, t in enumerate(row) if t in eos_set), None)
        results.append((row if cut is None else row[:cut], cut is not None))
    return results


def fit_prompts(prompt_ids: list[list[int]], model, max_new_tokens: int, path: str) -> list[list[int]]:
    """Keep prompt + response inside the model's context: over-long prompts keep their end (as in prepare_data)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return prompt_ids
    keep = limit - max_new_tokens
    if keep < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {path} "
                         f"(max_position_embeddings {limit})")
    n_cut = sum(len(p) > keep for p in prompt_ids)
    if n_cut:
        logger.warning("%s: %d prompts longer than %d tokens keep their last %d tokens", path, n_cut, keep, keep)
    return [p[-keep:] if len(p) > keep else p for p in prompt_ids]


@dataclass
class ModelGenerations:
    """Everything sampled from one model: texts[s][i] is the response to prompt i under seeds[s]."""

    name: str
    path: str
    prompt_texts: list[str]
    prompt_messages: list[list[dict]]  # as rendered (system prompt included), for reward models' own templates
    texts: list[list[str]]
    num_tokens: list[list[int]]
    finished: list[list[bool]]
    seconds: float


def generate(path: str, name: str, items: list[PromptItem], cfg: EvalConfig) -> ModelGenerations:
    model, tok, dev = load_policy(path, cfg.dtype, cfg.device)
    fmt = Formatter(tok, TemplateConfig(cfg.template, cfg.raw_template, cfg.system_prompt))
    messages = [fmt.prompt_messages(_as_example(it)) for it in items]
    prompt_texts = [fmt.prompt_text(m, it.where) for m, it in zip(messages, items)]
    prompt_ids = fit_prompts([x.tolist() for x in fmt.encode_prompts(prompt_texts)], model, cfg.max_new_tokens, path)
    gen_cfg = generation_config(model, tok, cfg)
    n, bs = len(items), cfg.batch_size
    gens = ModelGenerations(name, str(path), prompt_texts, messages, [], [], [], 0.0)
    t0, n_tokens = time.perf_counter(), 0
    bar = tqdm(total=n * len(cfg.seeds), desc=f"generate {name}", unit="prompt", dynamic_ncols=True,
               disable=None if cfg.progress else True)
    with bar:
        for seed in cfg.seeds:
            texts, lens, done = [], [], []
            for k, start in enumerate(range(0, n, bs)):
                torch.manual_seed(seed_for(seed, k))
                for ids, ended in sample_batch(model, prompt_ids[start:start + bs], gen_cfg, dev):
                    texts.append(tok.decode(ids, skip_special_tokens=True))
                    lens.append(len(ids))
                    done.append(ended)
                    n_tokens += len(ids)
                bar.update(min(bs, n - start))
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
    from megatron_var.data.scorers import FunctionScorer, HFRewardModel

    if cfg.reward_fn is not None:
        return FunctionScorer(cfg.reward_fn)
    return HFRewardModel(cfg.reward_model, cfg.rm_batch_size, cfg.rm_max_length, cfg.dtype, cfg.device)


def score_generations(scorer, gens: ModelGenerations, items: list[PromptItem], cfg: EvalConfig) -> np.ndarray:
    """[S, N] rewards of one model's generations; non-finite scores are an error (they would poison the mean)."""
    S, N = len(gens.texts), len(items)
    flat = scorer(gens.prompt_texts * S, gens.prompt_messages * S, [t for texts in gens.texts for t in texts])
    rewards_SN = np.asarray(flat, dtype=np.float64).reshape(S, N)
    if not np.isfinite(rewards_SN).all():
        s, i = np.argwhere(~np.isfinite(rewards_SN))[0].tolist()
        raise ValueError(f"scorer returned {rewards_SN[s, i]} for model {gens.name}, seed {cfg.seeds[s]}, "
                         f"prompt {items[i].where}")
    return rewards_SN


def evaluate(cfg: EvalConfig) -> dict:
    """Generate with every model, then score everything with one scorer (loaded once, after generation, so a
    large policy and a large reward model never share the GPU). Returns the results dict written as JSON."""
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars
    items = load_prompts(cfg.prompts, cfg.max_prompts)
    subsets = [it.subset for it in items]
    logger.info("%d prompts (%s)", len(items), dict(Counter(subsets)))
    all_gens = [generate(path, name, items, cfg) for path, name in zip(cfg.models, cfg.labels())]
    scorer = make_scorer(cfg)
    results, generations = [], []
    for gens in all_gens:
        rewards_SN = score_generations(scorer, gens, items, cfg)
        tokens = np.asarray(gens.num_tokens, dtype=np.float64)
        res = {"name": gens.name, "path": gens.path, **summarize(rewards_SN, subsets),
               "response_tokens_mean": float(tokens.mean()), "eos_rate": float(np.mean(gens.finished)),
               "generate_seconds": gens.seconds}
        results.append(res)
        for s, seed in enumerate(cfg.seeds):
            for i, it in enumerate(items):
                generations.append({"model": gens.name, "seed": seed, "index": i, "subset": it.subset,
                                    "prompt": gens.prompt_texts[i], "response": gens.texts[s][i],
                                    "reward": float(rewards_SN[s, i]), "tokens": gens.num_tokens[s][i],
                                    "finished": gens.finished[s][i]})
    config = {k: v for k, v in vars(cfg).items() if k != "progress"}
    return {"config": config, "scorer": scorer.identity, "n_prompts": len(items),
            "subsets": dict(Counter(subsets)), "results": results, "generations": generations}

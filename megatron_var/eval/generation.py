"""Sampling engines for eval_reward, and the data-parallel plumbing of the transformers engine.

transformers (default without vLLM): left-padded batched ``generate``; under torchrun each rank samples a disjoint
share and rank 0 gathers the results (gloo, CPU objects). Seeding is per batch of the *global* batch list: batch
k of seed s (prompts k*B .. k*B+B-1, B = --batch-size) is sampled right after ``torch.manual_seed(seed_for(s,
k))`` and rank r takes batches k = r, r + W, ... — so the generations do not depend on the number of ranks, only
on the model, prompts, --batch-size and seed (the batch composition changes padding and the random stream, so a
different --batch-size gives different, equally valid samples).

vLLM (``--engine vllm``, one process, tensor-parallel over --tensor-parallel-size GPUs): every prompt i gets its
own sampling seed ``seed_for(s, i)``; vLLM's sampler is not transformers', so its samples differ from the
transformers engine's even with the same seeds.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch

logger = logging.getLogger(__name__)

ENGINES = ("auto", "transformers", "vllm")


# ------------------------------------------------------------------------------------------ data parallel


class DistContext:
    """Rank and world from torchrun's environment; a gloo group only to gather Python objects on rank 0."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_env(cls) -> DistContext:
        world = int(os.environ.get("WORLD_SIZE", 1))
        ctx = cls(int(os.environ.get("RANK", 0)), world)
        if world > 1 and not torch.distributed.is_initialized():
            # generation of a large model can keep ranks apart for hours at a gather: generous timeout
            torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
        return ctx

    def gather(self, obj) -> list | None:
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def rank_batches(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(global batch index k, start, end) of this rank's batches: k = rank, rank + world_size, ..."""
    starts = range(0, n, batch_size)
    return [(k, s, min(s + batch_size, n)) for k, s in enumerate(starts) if k % world_size == rank]


def resolve_engine(engine: str, world_size: int) -> str:
    """auto -> vllm when importable with a GPU and not under a multi-process launcher, else transformers."""
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        engine = "vllm" if (_has_vllm() and torch.cuda.is_available() and world_size == 1) else "transformers"
    if engine == "vllm":
        if not _has_vllm():
            raise ValueError("--engine vllm: vllm is not installed (pip install 'megatron_var[vllm]' on a GPU "
                             "machine), or use --engine transformers")
        if world_size > 1:
            raise ValueError("--engine vllm runs as one process, tensor-parallel over --tensor-parallel-size GPUs: "
                             "start it without torchrun")
    return engine


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# ----------------------------------------------------------------------------------------- transformers


def seed_for(seed: int, batch_index: int) -> int:
    return seed * 1_000_003 + batch_index


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_policy(path: str, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer, device) of a local HF causal LM, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_var.data.reward_scorers import pick_device

    dev = pick_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_resolve_dtype(dtype, dev), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {path}: cannot load ({type(e).__name__}: {e})") from None
    if tok.eos_token_id is None:
        raise ValueError(f"--model {path}: tokenizer has no eos token; generation could not stop")
    return model.to(dev).eval(), tok, dev


def generation_config(model, tok, cfg):
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




# ---------------------------------------------------------------------------------------------------- vLLM


class VLLMEngine:
    """A thin adapter over ``vllm.LLM``: token-id prompts in, (response ids without eos, ended) out."""

    def __init__(self, path: str, cfg, tensor_parallel_size: int | None = None):
        import vllm  # resolve_engine has checked it is installed

        self.vllm, self.cfg = vllm, cfg
        tp = tensor_parallel_size or max(torch.cuda.device_count(), 1)
        dtype = "auto" if cfg.dtype == "auto" else cfg.dtype
        try:
            self.llm = vllm.LLM(model=path, tokenizer=path, tensor_parallel_size=tp, dtype=dtype, seed=0)
        except (OSError, ValueError) as e:
            raise ValueError(f"--model {path}: vLLM cannot load it ({type(e).__name__}: {e})") from None
        self.eos = set(_as_list(self.llm.get_tokenizer().eos_token_id))

    def generate(self, prompt_ids: list[list[int]], indices: list[int], seed: int) -> list[tuple[list[int], bool]]:
        """Per-prompt seeds seed_for(seed, i): a prompt's sample does not depend on what it is batched with."""
        cfg = self.cfg
        params = [self.vllm.SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                           top_k=cfg.top_k if cfg.top_k > 0 else -1, max_tokens=cfg.max_new_tokens,
                                           seed=seed_for(seed, i)) for i in indices]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=cfg.progress)
        results = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            ended = c.finish_reason == "stop"
            while ids and ids[-1] in self.eos:
                ids.pop()
            results.append((ids, ended))
        return results

    def close(self) -> None:
        del self.llm


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]

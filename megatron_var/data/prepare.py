"""prepare_data: local preference/instruction data -> tokenized VAR groups on disk (see docs/data-format.md).

Pipeline: rows -> adapter -> Example -> samples per ``responses`` mode -> render + tokenize (batched) -> fit to
``seq_length`` -> split by source row -> pack groups of B -> Parquet shards + meta.json, written atomically.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

from tqdm import tqdm

from megatron_var.common.atomic import atomic_directory
from megatron_var.data.adapters import ADAPTERS, FORMATS, BadRow, Example
from megatron_var.data.detection import SINGLE_RESPONSE, detect_format
from megatron_var.data.formatting import (
    DEFAULT_RAW_TEMPLATE,
    FIT_DROP,
    FIT_OK,
    Formatter,
    TemplateConfig,
    fit_length,
    load_tokenizer,
    messages_json,
)
from megatron_var.data.grouping import pack_groups, regroup, split_units
from megatron_var.data.groups import FORMAT_VERSION, grouping_dir, tokenizer_fingerprint
from megatron_var.data.readers import InputSource, is_hub_name
from megatron_var.data.writer import Sample, check_output_dir, write_meta, write_split

logger = logging.getLogger(__name__)

RESPONSE_MODES = ("chosen", "all", "pairs")
_CHUNK = 512  # samples tokenized per batch


@dataclass
class PrepareConfig:
    """Everything prepare_data needs; mirrors the CLI flags."""

    inputs: list[str]  # local files / save_to_disk dirs, or hub dataset names
    output: str
    tokenizer: str
    input_format: str = "auto"  # auto | one of adapters.FORMATS
    split: str | None = None  # DatasetDict / hub split; default train, else the only one
    template: str = "chat"  # chat | raw
    raw_template: str = DEFAULT_RAW_TEMPLATE
    system_prompt: str | None = None
    responses: str = "chosen"  # chosen | all | pairs (DPO: groups of exactly 2, chosen first)
    group_size: int | None = None  # B; default 8, and 2 for pairs
    seq_length: int = 2048  # max prompt + response tokens per sample
    overlong: str = "truncate"  # truncate | drop
    valid_fraction: float = 0.05
    seed: int = 1234
    shard_size: int = 1000  # groups per shard file
    regroup_epochs: int = 1  # groupings of the train samples (one per epoch, cycled): train/, train.g1/, ...
    overwrite: bool = False
    on_bad_row: str = "error"  # error | skip (counted by reason)
    ultrafeedback_score: str = "fine-grained"  # fine-grained | overall
    progress: bool = True

    def __post_init__(self):
        checks = [
            (self.input_format in ("auto", *FORMATS), f"--input-format must be auto or one of {FORMATS}"),
            (self.responses in RESPONSE_MODES, f"--responses must be one of {RESPONSE_MODES}"),
            (self.overlong in ("truncate", "drop"), "--overlong must be truncate or drop"),
            (self.on_bad_row in ("error", "skip"), "--on-bad-row must be error or skip"),
            (self.ultrafeedback_score in ("fine-grained", "overall"), "--ultrafeedback-score: fine-grained|overall"),
            (self.seq_length >= 2, "--seq-length must be at least 2"),
            (0.0 <= self.valid_fraction < 1.0, "--valid-fraction must be in [0, 1)"),
            (self.shard_size >= 1, "--shard-size must be at least 1"),
            (self.regroup_epochs >= 1, f"--regroup-epochs must be at least 1, got {self.regroup_epochs}"),
            (bool(self.inputs), "--input needs at least one path"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.group_size is None:
            self.group_size = 2 if self.responses == "pairs" else 8
        if self.responses == "pairs" and self.group_size != 2:
            raise ValueError(f"--responses pairs makes groups of exactly 2 (chosen, rejected); got --group-size "
                             f"{self.group_size}")
        if self.group_size < 1:
            raise ValueError("--group-size must be at least 1")
        if self.responses == "pairs" and self.regroup_epochs > 1:
            raise ValueError("--regroup-epochs needs --responses chosen or all: a pairs group is one prompt's "
                             "(chosen, rejected) and cannot be regrouped")
        TemplateConfig(self.template, self.raw_template, self.system_prompt)  # validates template flags


@dataclass
class Summary:
    """Counts for the end-of-run table and meta.json; samples are (prompt, response) pairs, rows are input rows."""

    input_formats: dict = field(default_factory=dict)  # input -> adapter used (detected or --input-format)
    rows_read: int = 0
    rows_dropped: Counter = field(default_factory=Counter)  # by reason (bad rows under skip, tied pairs)
    samples_built: int = 0
    samples_truncated: Counter = field(default_factory=Counter)  # prompt | response
    samples_dropped: Counter = field(default_factory=Counter)  # overlong | pair_partner_dropped | partial_group
    samples_written: int = 0
    groups_written: Counter = field(default_factory=Counter)  # by split

    @property
    def rows_kept(self) -> int:
        return self.rows_read - sum(self.rows_dropped.values())

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d = {k: dict(v) if isinstance(v, Counter) else v for k, v in d.items()}
        d["rows_kept"] = self.rows_kept
        return d

    def table(self) -> str:
        def fmt(c: Counter) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "-"

        lines = [
            ("input formats", ", ".join(f"{k}: {v}" for k, v in self.input_formats.items()) or "-"),
            ("rows read", self.rows_read), ("rows kept", self.rows_kept),
            ("rows dropped", f"{sum(self.rows_dropped.values())} ({fmt(self.rows_dropped)})"),
            ("samples built", self.samples_built),
            ("samples truncated", f"{sum(self.samples_truncated.values())} ({fmt(self.samples_truncated)})"),
            ("samples dropped", f"{sum(self.samples_dropped.values())} ({fmt(self.samples_dropped)})"),
            ("samples written", self.samples_written),
            ("groups written", f"{sum(self.groups_written.values())} ({fmt(self.groups_written)})"),
        ]
        return "\n".join(f"{name:<18} {value}" for name, value in lines)


def _select_responses(ex: Example, mode: str) -> list[str] | str:
    """Responses used as samples, or the reason (counted) the row is left out: a tied pair, or an unpaired-preference
    completion labelled undesirable under ``chosen`` (``all`` keeps it: its reward will say how bad it is)."""
    if mode == "chosen":
        if ex.label is False:
            return "undesirable_completion"
        used = ex.responses[:1]
    elif mode == "all":
        used = list(ex.responses)
    else:
        if len(ex.responses) < 2:
            raise BadRow(ex.where, "no_rejected", "--responses pairs needs a rejected response")
        if ex.scores is not None and ex.scores[0] == ex.scores[-1]:
            return "tied_pair"
        used = [ex.responses[0], ex.responses[-1]]
    for text in used:
        if not text.strip():
            raise BadRow(ex.where, "empty_response", "empty response")
    return used


class _Builder:
    """Accumulates texts, tokenizes them in chunks, and keeps the surviving units (samples of one row)."""

    def __init__(self, cfg: PrepareConfig, fmt: Formatter, summary: Summary):
        self.cfg, self.fmt, self.summary = cfg, fmt, summary
        self.units: list[list[Sample]] = []
        self._pending: list[tuple[str, str, list[str]]] = []  # (prompt_text, messages_json, responses)
        self._n_pending = 0  # responses in _pending

    def add(self, ex: Example) -> str | None:
        """Queue the row's samples; returns why the row was left out, if it was."""
        used = _select_responses(ex, self.cfg.responses)
        if isinstance(used, str):
            return used
        if not any(m["role"] == "user" and m["content"].strip() for m in ex.messages):
            raise BadRow(ex.where, "empty_prompt", "empty prompt")
        msgs = self.fmt.prompt_messages(ex)
        self._pending.append((self.fmt.prompt_text(msgs, ex.where), messages_json(msgs), used))
        self._n_pending += len(used)
        if self._n_pending >= _CHUNK:
            self.flush()
        return None

    def flush(self) -> None:
        if not self._pending:
            return
        prompt_ids = self.fmt.encode_prompts([p[0] for p in self._pending])
        resp_ids = self.fmt.encode_responses([r for p in self._pending for r in p[2]])
        k = 0
        for (ptext, pmsgs, responses), pids in zip(self._pending, prompt_ids):
            unit = []
            for rtext in responses:
                p, r, status = fit_length(pids, resp_ids[k], self.cfg.seq_length, self.cfg.overlong)
                k += 1
                self.summary.samples_built += 1
                if status == FIT_DROP:
                    self.summary.samples_dropped["overlong"] += 1
                    continue
                if status != FIT_OK:
                    self.summary.samples_truncated[status] += 1
                    if status == "response":  # the policy learns the cut text: score that one too
                        rtext = self.fmt.decode(r)
                unit.append(Sample(p, r, ptext, pmsgs, rtext))
            if self.cfg.responses == "pairs" and len(unit) != 2:
                self.summary.samples_dropped["pair_partner_dropped"] += len(unit)
                unit = []
            if unit:
                self.units.append(unit)
        self._pending, self._n_pending = [], 0


def _examples(cfg: PrepareConfig, summary: Summary):
    """Yield Examples from all inputs; bad rows raise (error) or are counted (skip)."""
    for path in cfg.inputs:
        source = InputSource(path, cfg.split)
        fmt_name = summary.input_formats[source.label] = _input_format(source, cfg)
        adapter = ADAPTERS[fmt_name]
        bar = tqdm(source, total=len(source), desc=Path(path).name, unit="row", disable=None if cfg.progress else True,
                   dynamic_ncols=True)
        for where, row in bar:
            summary.rows_read += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                yield adapter(row, where, score_key=cfg.ultrafeedback_score)
            except BadRow as e:
                _bad_row(e, cfg, summary)


def _input_format(source: InputSource, cfg: PrepareConfig) -> str:
    """The adapter for one input (detected unless --input-format), refusing a --responses mode it cannot make."""
    fmt_name = cfg.input_format
    if fmt_name == "auto":
        fmt_name = detect_format(source.columns(), source.label, source.first_row())
        logger.info("%s: detected format %s", source.label, fmt_name)
    if cfg.responses == "pairs" and fmt_name in SINGLE_RESPONSE:
        raise ValueError(f"{source.label}: {fmt_name} rows hold one response each; --responses pairs needs a chosen "
                         "and a rejected response per prompt (use --responses chosen or all)")
    return fmt_name


def _bad_row(e: BadRow, cfg: PrepareConfig, summary: Summary) -> None:
    if cfg.on_bad_row == "error":
        raise ValueError(f"{e} (pass --on-bad-row skip to skip and count such rows)") from None
    summary.rows_dropped[e.reason] += 1
    if sum(summary.rows_dropped.values()) <= 5:
        logger.warning("skipping bad row: %s", e)


def prepare(cfg: PrepareConfig) -> Summary:
    """Run the whole preparation; returns the summary (also stored in meta.json)."""
    output = Path(cfg.output)
    check_output_dir(output, cfg.overwrite, {"--input": list(cfg.inputs), "--tokenizer": [cfg.tokenizer]})
    for path in cfg.inputs:
        if not Path(path).exists() and not is_hub_name(str(path)):
            raise ValueError(f"--input {path}: no such file or directory")
    tokenizer = load_tokenizer(cfg.tokenizer)
    template = TemplateConfig(cfg.template, cfg.raw_template, cfg.system_prompt)
    fmt = Formatter(tokenizer, template)
    summary = Summary()
    builder = _Builder(cfg, fmt, summary)
    for ex in _examples(cfg, summary):
        try:
            reason = builder.add(ex)
            if reason:
                summary.rows_dropped[reason] += 1
        except BadRow as e:
            _bad_row(e, cfg, summary)
    builder.flush()

    B = cfg.group_size
    units = builder.units
    train_idx, valid_idx = split_units([len(u) for u in units], cfg.valid_fraction, B, cfg.seed)
    pairs = cfg.responses == "pairs"
    splits = {}
    for name, idx in (("train", train_idx), ("valid", valid_idx)):
        groups, leftover = pack_groups([units[k] for k in idx], B, cfg.seed, keep_units=pairs)
        if leftover:
            summary.samples_dropped["partial_group"] += leftover
        splits[name] = (groups, len(idx))
    if not splits["train"][0]:
        raise ValueError(f"no complete group of {B} samples could be formed from {cfg.inputs} "
                         f"(rows read {summary.rows_read}, samples kept {len([s for u in units for s in u])})")

    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "name_or_path": str(cfg.tokenizer),
            "vocab_size": len(tokenizer),
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
        },
        "template": {"kind": template.kind, "raw_template": template.raw_template if template.kind == "raw" else None,
                     "system_prompt": template.system_prompt},
        "group_size": B, "seq_length": cfg.seq_length, "responses": cfg.responses, "seed": cfg.seed,
        "inputs": [str(p) for p in cfg.inputs], "input_format": cfg.input_format, "split": cfg.split,
        "overlong": cfg.overlong,
        "splits": {},
    }
    with atomic_directory(output, overwrite=cfg.overwrite) as tmp:
        first_id = 0
        for name, (groups, n_units) in splits.items():
            n_shards = write_split(tmp / name, groups, first_id, cfg.shard_size)
            n_samples = sum(len(g) for g in groups)
            meta["splits"][name] = {"groups": len(groups), "samples": n_samples, "shards": n_shards,
                                    "source_rows": n_units, "first_group_id": first_id}
            summary.groups_written[name] = len(groups)
            summary.samples_written += n_samples
            first_id += len(groups)
        train = meta["splits"]["train"]
        train["groupings"] = cfg.regroup_epochs
        for e in range(1, cfg.regroup_epochs):  # ids continue after valid's, so grouping 0's and valid's stay put
            groups = regroup(splits["train"][0], e, cfg.seed)
            name = grouping_dir("train", e)
            n_shards = write_split(tmp / name, groups, first_id, cfg.shard_size)
            train.setdefault("extra_groupings", {})[name] = {"groups": len(groups), "shards": n_shards,
                                                             "first_group_id": first_id}
            first_id += len(groups)
        meta["summary"] = summary.as_dict()
        write_meta(tmp, meta)
    if cfg.valid_fraction > 0 and not splits["valid"][0]:
        logger.warning("valid split is empty: too few groups for --valid-fraction %s", cfg.valid_fraction)
    return summary

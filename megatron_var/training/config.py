"""The training run's whole configuration: one dataclass per concern, nested in ``TrainConfig``.

Why one tree: the defaults, the documentation and the validation of every setting live here once; the command line
(``megatron_var/cli/train.py``) is generated from these classes (field name -> Megatron-LM flag, the attribute
docstring -> ``--help``), metrics sinks record ``dataclasses.asdict`` of it, and a test can build a run without
argv. Each class checks its own fields in ``__post_init__``; ``TrainConfig`` checks combinations across them, so
an unknown or conflicting combination is a one-line ``ValueError`` before any process group or model exists.

Field metadata the CLI generator (``megatron_var/cli/config_args.py``) reads: ``flag`` (the option name when it is
not ``--`` + the field name), ``choices``, ``negatable`` (a ``--no-`` form, as Megatron-LM's ``--no-...`` flags; bools
that default to True always get one), ``required`` and ``run_length`` (options that replace each other: the last
one given wins).
Model-parallel layout and AdamW settings are the runtime layer's own dataclasses (``runtime.parallel.ParallelConfig``,
``runtime.engine.OptimConfig``), nested here, so their defaults are written once too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_var.models.gpt import ModelOptions
from megatron_var.runtime.engine import OptimConfig
from megatron_var.runtime.parallel import ParallelConfig

OBJECTIVE_NAMES = ("var", "sft", "dpo", "alol")


def flag(name: str, **meta) -> dict:
    """Field metadata naming the CLI option (``field(metadata=flag("--objective"))``)."""
    return dict(meta, flag=name)


@dataclass
class ModelConfig:
    """Model source and how its layers run (the shape itself comes from the checkpoint)."""

    model_arch: Optional[str] = None
    """model_arch.json of a randomly initialised model (instead of --load)."""
    bf16: bool = False
    """bf16 parameters and activations with fp32 main weights in the optimizer (default on GPU)."""
    fp16: bool = False
    """fp16 parameters with dynamic loss scaling (GPU only)."""
    transformer_impl: str = field(default="auto", metadata={"choices": ("auto", "te", "local")})
    """Layer implementation: te (Transformer Engine), local (megatron local spec), auto (te when importable + CUDA)."""
    flex_attention: bool = field(default=True, metadata={"negatable": True})
    """Score shared-prefix cross pairs with FlexAttention block masks (CUDA only; else dense masked SDPA)."""
    recompute_granularity: Optional[str] = field(default=None, metadata={"choices": ("selective", "full")})
    """Activation recomputation, as Megatron-LM: selective (the core attention of every layer) or full (every
    layer keeps only its input and is recomputed whole in backward: the big memory saving, about one more forward)."""
    recompute_activations: bool = False
    """Megatron-LM's shorthand for --recompute-granularity selective."""

    def __post_init__(self):
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 exclude each other")
        if self.recompute_activations:
            if self.recompute_granularity == "full":
                raise ValueError("--recompute-activations means --recompute-granularity selective; "
                                 "it conflicts with --recompute-granularity full")
            self.recompute_granularity = "selective"

    def options(self, on_gpu: bool) -> ModelOptions:
        """The model builder's options; bf16 is the default on GPU, fp32 on CPU."""
        dtype = "fp16" if self.fp16 else "bf16" if (self.bf16 or on_gpu) else "fp32"
        return ModelOptions(params_dtype=dtype, transformer_impl=self.transformer_impl,
                            recompute_granularity=self.recompute_granularity, flex_attention=self.flex_attention)


@dataclass
class OptimizerConfig(OptimConfig):
    """AdamW (``runtime.engine.OptimConfig``) and its learning-rate schedule, in Megatron-LM's flags."""

    lr_warmup_iters: int = 0
    """Linear warmup over this many iterations."""
    lr_warmup_fraction: Optional[float] = None
    """Linear warmup over this fraction of the decay length (the run, or --lr-decay-iters), fixed when the run
    starts (instead of --lr-warmup-iters)."""
    lr_decay_iters: Optional[int] = None
    """Reach --min-lr after this many iterations x --global-batch-size groups (default: the whole run), then hold
    it."""
    lr_decay_style: str = field(default="cosine", metadata={"choices": ("cosine", "linear", "constant")})
    """Shape of the decay after warmup."""

    def __post_init__(self):
        super().__post_init__()
        if self.lr_warmup_iters < 0:
            raise ValueError(f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}")
        if self.lr_warmup_fraction is not None:
            if self.lr_warmup_iters:
                raise ValueError("give one of --lr-warmup-iters and --lr-warmup-fraction")
            if not 0.0 <= self.lr_warmup_fraction < 1.0:
                raise ValueError(f"--lr-warmup-fraction must be in [0, 1), got {self.lr_warmup_fraction}")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ValueError(f"--lr-decay-iters must be >= 1, got {self.lr_decay_iters}")


@dataclass
class DataConfig:
    """What to train on, in which batches, for how long. Batch sizes count groups (B samples each)."""

    data_path: str = field(default="", metadata={"required": True})
    """Directory written by tools/prepare_data.py."""
    micro_batch_size: int = 1
    """Groups per micro-batch."""
    global_batch_size: int = 1
    """Groups per iteration over all data-parallel ranks (= micro-batch x accumulation x DP)."""
    train_iters: Optional[int] = field(default=None, metadata={"run_length": True})
    """Run length in iterations (a later --train-iters, --train-samples or --epochs replaces an earlier one)."""
    train_samples: Optional[int] = field(default=None, metadata={"run_length": True})
    """Run length in groups, the unit of --global-batch-size (Megatron-LM's samples): no step ends past it (an
    epoch's tail skipped for being shorter than a global batch counts as consumed)."""
    epochs: Optional[float] = field(default=None, metadata={"run_length": True})
    """Run length in passes over the train split."""
    seed: int = 1234
    """Seeds weights (random init), data order and dropout."""
    pack_sequences: bool = field(default=True, metadata={"negatable": True})
    """Lay the policy's pairs of a micro-batch end to end in rows (each attends only to itself) instead of padding
    every pair to the longest: the same numbers, less padding; the reference's rows of a step's groups likewise.
    The policy's is off with activation recomputation."""
    max_tokens_per_micro_batch: Optional[int] = None
    """Form policy micro-batches from whole groups of up to this many tokens each, packed into one row (instead
    of --micro-batch-size groups padded); the VAR weights still see each whole group. The reference packs its
    rows of the step's groups into micro-batches of one row of up to this many tokens."""

    def __post_init__(self):
        for name in ("micro_batch_size", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("--global-batch-size must be a multiple of --micro-batch-size")
        if self.max_tokens_per_micro_batch is not None:
            if self.max_tokens_per_micro_batch < 1:
                raise ValueError(f"--max-tokens-per-micro-batch must be >= 1, got {self.max_tokens_per_micro_batch}")
            if not self.pack_sequences:
                raise ValueError("--max-tokens-per-micro-batch packs rows: it conflicts with --no-pack-sequences")
            if self.micro_batch_size != 1:
                raise ValueError("give one of --micro-batch-size and --max-tokens-per-micro-batch")
        given = [n for n in ("train_iters", "train_samples", "epochs") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of --train-iters, --train-samples and --epochs")
        if getattr(self, given[0]) <= 0:  # (not `x or 1`: that let --train-iters 0 through)
            raise ValueError(f"--{given[0].replace('_', '-')} must be > 0, got {getattr(self, given[0])}")
        if self.train_samples is not None and self.train_samples < self.global_batch_size:
            raise ValueError(f"--train-samples {self.train_samples} is less than one --global-batch-size "
                             f"({self.global_batch_size} groups)")


@dataclass
class ObjectiveConfig:
    """The loss: VAR (the paper), SFT, DPO or A-LoL, and their hyper-parameters."""

    name: str = field(default="var", metadata=flag("--objective", choices=OBJECTIVE_NAMES))
    """var: reward-weighted SFT with in-batch weights; sft; dpo; alol: A-LoL / R-LoL (Baheti et al.)."""
    var_lambda: float = 1.0
    """λ: rewards enter the VAR weights as r/λ."""
    logp_reduction: str = field(default="sum", metadata=flag("--var-logp-reduction", choices=("sum", "mean")))
    """Sequence log-prob = sum (the paper) or per-token mean of the response's token log-probs."""
    dpo_beta: float = 0.1
    """DPO's β: scales the policy-vs-reference log-ratio margin inside the sigmoid."""
    alol_clip: float = 0.2
    """A-LoL: clip the importance weight π_θ/π_ref to [1 - ε, 1 + ε]."""
    alol_variant: str = field(default="alol", metadata={"choices": ("alol", "rlol")})
    """alol: advantage r - V(x), positive only (V = mean reward of x over its group); rlol: the reward itself."""
    max_nan_skips: int = 10
    """Skip the update of an iteration whose loss is NaN/inf; stop (exit 3) after more than this many."""

    def __post_init__(self):
        if self.name not in OBJECTIVE_NAMES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVE_NAMES)}, got {self.name!r}")
        if self.var_lambda <= 0:
            raise ValueError(f"--var-lambda must be > 0, got {self.var_lambda}")
        if not 0.0 < self.alol_clip < 1.0:
            raise ValueError(f"--alol-clip must be in (0, 1), got {self.alol_clip}")
        if self.dpo_beta <= 0:
            raise ValueError(f"--dpo-beta must be > 0, got {self.dpo_beta}")

    @property
    def needs_rewards(self) -> bool:
        return self.name in ("var", "alol")

    @property
    def needs_reference(self) -> bool:
        return self.name != "sft"


@dataclass
class ReferenceConfig:
    """The frozen reference policy: where its weights come from and how it is scored."""

    ref_load: Optional[str] = None
    """Reference checkpoint (default: the policy's initial --load weights)."""
    ref_offload: bool = False
    """Keep the reference weights on the CPU between uses (GPU memory for the policy)."""
    ref_cache: bool = False
    """Score every group's reference values once before training (same layout) and train from <save>/ref_cache.pt."""
    cross_pair_method: str = field(default="shared_prefix", metadata={"choices": ("shared_prefix", "naive")})
    """shared_prefix: one row [x_i; y_1..y_B] per prompt; naive: B² rows [x_i; y_j]."""

    def __post_init__(self):
        if self.ref_offload and self.ref_cache:
            raise ValueError("--ref-offload and --ref-cache exclude each other (a cached reference holds no weights)")


@dataclass
class CheckpointConfig:
    """Loading, saving and stopping (Megatron-LM's flags and meanings)."""

    load: Optional[str] = None
    """megatron_var checkpoint to start from (converted from HF, or saved by training: resumed)."""
    finetune: bool = False
    """Load only the weights of --load and start a fresh run (iteration 0, new optimizer)."""
    ckpt_step: Optional[int] = None
    """Load this iteration of --load instead of the latest."""
    no_load_optim: bool = False
    """Resume the iteration and data position of --load but not its optimizer state."""
    no_load_rng: bool = False
    """Do not restore the RNG states saved with --load."""
    save: Optional[str] = None
    """Checkpoint directory of this run; a new run into one that holds another run is refused (see --overwrite)."""
    save_interval: Optional[int] = None
    """Save every N iterations."""
    save_interval_mins: Optional[float] = None
    """Also save when N minutes of wall time have passed since the last save."""
    overwrite: bool = False
    """Start a new run in --save although it holds another run: DELETES that run's checkpoints and metrics first."""
    exit_duration_in_mins: Optional[float] = None
    """Save and exit 0 once the job has run this many minutes (leave time for the save)."""
    exit_interval: Optional[int] = None
    """Save and exit 0 after an iteration divisible by this."""

    def __post_init__(self):
        for name in ("exit_duration_in_mins", "save_interval_mins"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")
        for name in ("exit_interval", "save_interval"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.finetune and self.load is None:
            raise ValueError("--finetune needs --load")
        if self.ckpt_step is not None and self.load is None:
            raise ValueError("--ckpt-step needs --load")


@dataclass
class LoggingConfig:
    """Metrics: the log line (rank 0), <save>/metrics.jsonl, TensorBoard, wandb; and validation."""

    log_interval: int = 1
    """Log a line every N iterations (rates averaged over the interval)."""
    eval_interval: Optional[int] = None
    """Validate on the held-out split every N iterations (and at the end)."""
    eval_iters: int = 10
    """Global batches per validation."""
    tensorboard_dir: Optional[str] = None
    """Also write scalars for TensorBoard here."""
    wandb_project: Optional[str] = None
    """Also log to wandb (credentials of `wandb login` or WANDB_API_KEY; offline mode without either)."""
    wandb_exp_name: Optional[str] = None
    """wandb run name (default: wandb's)."""

    def __post_init__(self):
        for name in ("log_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_interval is not None and self.eval_interval < 1:
            raise ValueError(f"--eval-interval must be >= 1, got {self.eval_interval}")


@dataclass
class TrainConfig:
    """One training run. Groups appear in ``--help`` in this order."""

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Combinations across groups (each group has checked its own fields)."""
        if not self.data.data_path:
            raise ValueError("--data-path is required")
        if self.checkpoint.load is None and self.model.model_arch is None:
            raise ValueError("give --load (a megatron_var checkpoint) or --model-arch (random init)")
        if self.reference.ref_cache and not self.objective.needs_reference:
            raise ValueError("--ref-cache needs --objective var, dpo or alol (SFT has no reference)")
        if self.data.max_tokens_per_micro_batch and self.parallel.virtual_pipeline_model_parallel_size:
            raise ValueError("--max-tokens-per-micro-batch varies the number of micro-batches; the interleaved "
                             "schedule (--virtual-pipeline-model-parallel-size) needs a fixed one")
        if self.model.fp16 and not torch.cuda.is_available():
            raise ValueError("--fp16 needs a GPU (CPU runs use fp32 or --bf16)")

"""Typed configuration schema: one dataclass per YAML section.

Every key a user can set lives here, with its default and its range: each section
checks its own values in ``__post_init__`` (one :class:`ConfigError` naming the key and
the fix), so a bad value stops the run before any process starts. ``megalm.config.load``
turns YAML plus ``dotted.key=value`` overrides into these objects and rejects unknown
keys and wrong types. Rules that combine sections with the world size (the parallel
layout) live in :func:`megalm.parallel.layout.layout_problems`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from megalm.config.errors import require


def _positive(section: str, obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(value > 0, f"{section}.{name} must be > 0, got {value}")


def _non_negative(section: str, obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(value >= 0, f"{section}.{name} must be >= 0, got {value}")


@dataclass
class RunConfig:
    """Where outputs go and the global seed. ``tensorboard``: also write every logged number as
    TensorBoard scalars under ``<dir>/tensorboard`` (the ``tensorboard`` extra; off by
    default, as in Megatron-LM and torchtitan: its import costs seconds at every start)."""

    dir: str = "runs/tiny"
    seed: int = 1234
    tensorboard: bool = False


@dataclass
class ModelConfig:
    """Language model shape.

    ``family`` picks the recipe:

    - ``llama``: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention, no biases,
      untied output head.
    - ``gpt2``: LayerNorm, learned positions, GELU MLP, biases, tied embeddings.
    - ``lstm``: the recurrent baseline (``megalm/model/lstm.py``): token embedding ->
      ``n_layers`` LSTM layers of ``d_model`` units -> linear head, ``dropout`` between
      them; the attention keys (``n_heads``, ``n_kv_heads``, ``attention``...) are unused.

    ``attention`` picks the attention core of the Transformer families: ``flash``
    (FlashAttention-2 kernel, SDPA off CUDA) or ``unfused`` (``Q K^T`` -> fused
    scale-mask-softmax kernel -> ``P V``, Megatron's FusedScaleMaskSoftmax path).
    """

    family: Literal["llama", "gpt2", "lstm"] = "llama"
    vocab_size: int = 0  # 0: take it from the tokenizer named in the data manifest
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (multi-head attention)
    ffn_hidden: int = 0  # 0: 4*d_model (gpt2) or the Llama 2/3*4*d rounded to 64 (llama)
    seq_len: int = 256
    dropout: float = 0.0  # hidden dropout: after the embedding and on each residual branch
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_embeddings: bool | None = None  # None: the family's default (gpt2 tied, llama untied)
    kernels: Literal["auto", "triton", "torch"] = "auto"
    attention: Literal["flash", "unfused"] = "flash"
    vocab_multiple: int = 128  # pad the vocabulary to a multiple of vocab_multiple * parallel.tp

    def __post_init__(self) -> None:
        _positive("model", self, "n_layers", "d_model", "n_heads", "seq_len", "norm_eps", "rope_theta")
        _positive("model", self, "init_std", "vocab_multiple")
        _non_negative("model", self, "vocab_size", "n_kv_heads", "ffn_hidden")
        require(0 <= self.dropout < 1, f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.family == "lstm":
            return  # no attention heads
        require(
            self.d_model % self.n_heads == 0,
            f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})",
        )
        require(
            self.n_heads % self.kv_heads == 0,
            f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.kv_heads})",
        )
        require(
            self.family != "llama" or self.head_size % 2 == 0,
            f"RoPE needs an even head size: model.d_model / model.n_heads = {self.head_size}",
        )

    @property
    def head_size(self) -> int:
        """Channels per attention head, ``d_model / n_heads``."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` (multi-head attention) when 0."""
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_size(self) -> int:
        """MLP width: ``ffn_hidden``, or the family default.

        gpt2: ``4 d``. llama: ``2/3 * 4 d`` rounded up to a multiple of 64, so the three
        SwiGLU matrices hold about as many parameters as a ``4 d`` GELU MLP
        (Shazeer 2020, section 2; Touvron et al. 2023).
        """
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.family == "gpt2":
            return 4 * self.d_model
        return 64 * math.ceil(int(2 * 4 * self.d_model / 3) / 64)

    @property
    def tied(self) -> bool:
        """Whether the output head shares the token embedding (gpt2 default) or not (llama)."""
        return self.family == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    def padded_vocab(self, tp: int = 1) -> int:
        """Vocabulary rounded up to a multiple of ``vocab_multiple * tp`` (Megatron-LM's
        ``make_vocab_size_divisible_by``): even shards and matmul-friendly sizes. Padded
        rows are never targets and are masked out of the loss and of sampling."""
        m = self.vocab_multiple * tp
        return -(-self.vocab_size // m) * m


@dataclass
class DataConfig:
    """Tokenized webdataset shards written by ``data_tools.preprocess``.

    ``dir`` is a local directory or a remote one: ``http(s)://host/path``,
    ``s3://bucket/path`` (needs the ``aws`` CLI), ``gs://bucket/path`` (``gsutil``), or
    ``pipe:COMMAND`` (prints a file; ``{}`` stands for its name). Remote shards are
    fetched into ``cache_dir`` (``""``: ``$TMPDIR/megalm-cache-<uid>``, one per node,
    shared by its ranks), verified by sha256 and evicted least recently used beyond
    ``cache_gb``; a failed transfer is retried ``fetch_retries`` times with backoff.
    ``blend`` mixes several shard directories for training in exact proportions,
    ``"0.7:data/web,0.3:data/code"`` (``dir`` still provides the tokenizer and the
    held-out split); empty means train on ``dir`` alone. ``on_bad_data``: ``raise``
    stops on a missing, corrupt or undecodable shard naming the file; ``skip`` leaves
    it out, logs and counts it (the list is saved in checkpoints). ``document_mask``: a
    packed window's tokens attend only within their own document and positions (RoPE,
    learned) restart at 0 after every EOS (``PackedWindows`` ``with_ids``).
    """

    dir: str = "data/stdlib/shards"
    seed: int = 1234
    blend: str = ""
    workers: int = 0  # processes per rank building micro-batches (0: in the training process)
    on_bad_data: Literal["raise", "skip"] = "raise"
    verify: bool = True  # check every local shard's sha256 against the manifest when opening it
    cache_dir: str = ""  # remote dir: where fetched shards are kept ("": $TMPDIR/megalm-cache-<uid>)
    cache_gb: float = 50.0  # remote dir: size bound of the shard cache (least recently used evicted)
    fetch_retries: int = 3  # remote dir: retries of a failed transfer (backoff 0.5 s, 1 s, 2 s, ...)
    document_mask: bool = False  # packed windows: no attention across documents, positions restart
    prefetch: bool = True  # build the next step's micro-batches while this one trains (a thread)

    def __post_init__(self) -> None:
        _non_negative("data", self, "workers")


@dataclass
class TrainingConfig:
    """Step counts, batch sizes, intervals and resume policy.

    ``global_batch`` (sequences per optimizer step) is the layout invariant;
    gradient accumulation is derived: ``global_batch / (micro_batch * dp)``.
    """

    max_steps: int = 300
    global_batch: int = 16
    micro_batch: int = 8
    resume: str = "auto"  # auto | never | path to a checkpoint tag directory
    resume_fallback: bool = True  # auto: a newest tag that fails verification -> the newest that verifies
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    save_interval: int = 100
    keep_checkpoints: int = 2
    async_save: bool = False  # copy the state to host memory, write the files in a background thread
    save_timeout_s: float = 600.0  # bound on waiting for a save (in flight, or every rank's files)
    sample_tokens: int = 64
    sample_prompt: str = "def "
    sample_temperature: float = 0.8
    sample_top_k: int = 20
    recompute: Literal["none", "full"] = "none"  # activation checkpointing of transformer blocks
    recompute_interval: int = 1  # keep the input of every N blocks, recompute the rest
    compile: bool = False  # torch.compile each transformer block and the loss (megalm/model/compile.py)
    # Numerical health (megalm/train/health.py), decided before each optimizer step.
    on_nonfinite: Literal["skip", "stop"] = "skip"  # a NaN/inf loss or gradient
    max_skipped_steps: int = 20  # skipped steps (non-finite or spikes) allowed in a run, then stop
    spike_factor: float = 0.0  # a loss above factor x the running median is a spike (0: off)
    spike_window: int = 50  # applied steps in the running median
    on_spike: Literal["skip", "stop", "rollback"] = "skip"

    def __post_init__(self) -> None:
        _positive("training", self, "max_steps", "global_batch", "micro_batch", "log_interval")
        _positive("training", self, "eval_interval", "eval_batches", "save_interval", "recompute_interval")
        _positive("training", self, "save_timeout_s")
        _non_negative("training", self, "keep_checkpoints", "sample_tokens", "sample_top_k")
        _non_negative("training", self, "sample_temperature", "max_skipped_steps")
        _positive("training", self, "spike_window")
        require(
            self.spike_factor == 0 or self.spike_factor > 1,
            f"training.spike_factor must be 0 (off) or > 1, got {self.spike_factor}",
        )


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr``."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    decay_steps: int = 0  # 0: decay over training.max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _positive("optim", self, "lr", "eps")
        _non_negative("optim", self, "min_lr", "warmup_steps", "decay_steps", "weight_decay", "grad_clip")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(0 <= value < 1, f"optim.{name} must be in [0, 1), got {value}")


@dataclass
class ParallelConfig:
    """Parallel degrees. Data parallelism is whatever the world size leaves.

    ``cp``: context parallelism, each sequence split over ``cp`` ranks that run ring
    attention (``megalm/parallel/ring.py``); for long sequences.
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    pp_partition: Literal["uniform", "parameters"] = "uniform"  # uniform: equal transformer blocks per stage

    def __post_init__(self) -> None:
        _positive("parallel", self, "tp", "pp", "cp")


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO stage (0: plain data parallel)."""

    stage: Literal[0, 1, 2, 3] = 0


@dataclass
class PrecisionConfig:
    """Compute dtype; ``auto`` is bf16 on CUDA and fp32 on CPU."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


@dataclass
class DistConfig:
    """Process-group settings."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: int = 600
    straggler_factor: float = 1.5  # a rank slower than factor x the median step time is named (0: off)

    def __post_init__(self) -> None:
        _positive("dist", self, "timeout_s")
        require(
            self.straggler_factor == 0 or self.straggler_factor > 1,
            f"dist.straggler_factor must be 0 (off) or > 1, got {self.straggler_factor}",
        )


@dataclass
class PreemptConfig:
    """Stopping cleanly when the scheduler preempts the job (``megalm/train/preempt.py``).

    Any of ``signals`` on any rank stops every rank at the same step boundary; they
    save a checkpoint, rank 0 requeues the Slurm job when ``requeue`` is set, and
    every rank exits with ``exit_code``. A save that would end later than
    ``grace_s`` after the signal is abandoned (the previous checkpoint stays valid).
    """

    signals: str = "SIGUSR1,SIGTERM"  # comma-separated; empty: no handlers
    grace_s: float = 120.0
    requeue: bool = True
    exit_code: int = 75  # EX_TEMPFAIL: stopped early on purpose, run again to continue

    def __post_init__(self) -> None:
        _non_negative("preempt", self, "grace_s")
        require(0 <= self.exit_code <= 255, f"preempt.exit_code must be in [0, 255], got {self.exit_code}")


@dataclass
class Config:
    """The whole resolved configuration of one run."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)

    def __post_init__(self) -> None:
        require(
            not (self.data.document_mask and self.model.family == "lstm"),
            "data.document_mask=true needs an attention model: model.family=lstm reads each window as "
            "one sequence; use model.family=llama or gpt2, or data.document_mask=false",
        )
        if self.training.compile:
            problems = compile_problems(self)
            require(not problems, "; ".join(problems))


def compile_problems(cfg: Config) -> list[str]:
    """Why ``training.compile=true`` cannot run with ``cfg`` (empty: it can).

    Each compiled block is one graph without breaks (``fullgraph``), so everything a block
    runs must be traceable (:mod:`megalm.model.compile`).
    """
    out = []
    if cfg.model.family == "lstm":
        out.append(
            "training.compile=true with model.family=lstm: compilation is per transformer block and the "
            "LSTM baseline has none; use model.family=llama or gpt2, or training.compile=false"
        )
    if cfg.parallel.cp > 1:
        out.append(
            f"training.compile=true with parallel.cp={cfg.parallel.cp}: ring attention exchanges key/value "
            "blocks point-to-point inside the block, which a compiled graph cannot hold; use parallel.cp=1 "
            "or training.compile=false"
        )
    if cfg.zero.stage == 3:
        out.append(
            "training.compile=true with zero.stage=3: ZeRO-3 gathers each layer's parameters in module "
            "hooks that run inside the compiled block; use zero.stage<=2 or training.compile=false"
        )
    return out

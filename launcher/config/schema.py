"""Typed schemas behind every config group.

Each group in `conf/` (zero, offload, activation_checkpointing, precision, model, adapter, hardware, cluster)
merges into one of these dataclasses, so OmegaConf rejects unknown keys and wrong types while composing.
Cross-field rules (batch arithmetic, combinations) live in `launcher.config.validate`.
This module imports neither torch nor deepspeed: it runs on the submitting host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ZeroConfig:
    stage: int = 2
    # zero=auto: the planner picks the stage (and offload, unless set) predicted fastest that fits.
    auto: bool = False
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    # Bucket sizes are element counts, DeepSpeed's unit. 5e8 elements is DeepSpeed's default.
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    # Lets save_checkpoint also write 16-bit consolidated weights under ZeRO-3 (usable without zero_to_fp32).
    stage3_gather_16bit_weights_on_model_save: bool = True


@dataclass
class OffloadConfig:
    name: str = "none"
    # "none" or "cpu": where the optimizer state lives and the optimizer step runs.
    optimizer: str = "none"
    # Also offload the parameters themselves (ZeRO-3 only).
    params: bool = False
    pin_memory: bool = True


@dataclass
class ActivationCheckpointingConfig:
    name: str = "none"
    enabled: bool = False
    # Without tensor parallelism DeepSpeed keeps a full flat copy per rank (no sharding); it is what
    # enables cpu_checkpointing. See docs in README ("Activation checkpointing").
    partition_activations: bool = False
    cpu_checkpointing: bool = False
    contiguous_memory_optimization: bool = False
    # Recompute every n-th decoder layer (1 = all layers).
    every_n_layers: int = 1


@dataclass
class PrecisionConfig:
    # auto: bf16 where the hardware has it, fp16 on GPUs without, fp32 on CPU ranks (resolved at launch).
    name: str = "auto"
    # fp16 dynamic loss scaling (DeepSpeed's `loss_scale: 0`); ignored for fp32/bf16.
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    # Stop the run when the loss scale sits at min_loss_scale this many consecutive steps.
    max_steps_at_min_scale: int = 20


@dataclass
class ModelConfig:
    name: str = "tiny_llama"
    # Local Hugging Face model directory (config.json, weights, tokenizer). null: build from the fields below.
    path: Optional[str] = None
    vocab_size: int = 320
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attn_implementation: str = "sdpa"
    # HF model_type (llama, qwen2, qwen3, mistral, gemma2, phi3, ...): with model.path, from its config.json.
    model_type: str = "llama"
    # Per-head width; null: hidden_size / num_attention_heads (Gemma 2 and Qwen 3 set it explicitly).
    head_dim: Optional[int] = None
    # Biases on the q/k/v projections (Qwen 2/2.5).
    attention_bias: bool = False
    # Sliding-window attention width in tokens (Mistral, Gemma 2 local layers); null: full attention.
    sliding_window: Optional[int] = None


@dataclass
class AdapterConfig:
    # "none" (every weight trains) or "lora" (PEFT LoRA adapters on a frozen base).
    name: str = "none"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Module names (suffixes) to adapt, or [all-linear]: every linear layer of the decoder (not lm_head).
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    # "none", "all" or "lora_only": which biases train.
    bias: str = "none"
    # Modules trained in full and saved with the adapter (e.g. lm_head).
    modules_to_save: List[str] = field(default_factory=list)
    # QLoRA (4-/8-bit base) is not supported: setting either is refused at launch.
    load_in_4bit: bool = False
    load_in_8bit: bool = False


@dataclass
class HardwareConfig:
    name: str = "local"
    # null: detect this node's GPUs at launch (CPU ranks when there are none).
    gpus_per_node: Optional[int] = None
    # Ranks per node when the node has no GPU (DeepSpeed's CPU accelerator, gloo backend).
    cpu_ranks: int = 2
    # What nvidia-smi must report at launch (a regular expression, e.g. "H100", "A100"); with gpu_memory_gib
    # (within 8%) it tells an A100-40GB from an A100-80GB. null: not checked.
    gpu_name: Optional[str] = None
    gpu_memory_gib: Optional[float] = None
    # Dense bf16/fp16 peak per GPU, TFLOP/s (MFU denominator). null: MFU is not reported.
    peak_tflops: Optional[float] = None
    bf16: bool = False
    host_ram_gib: Optional[float] = None
    # GB/s per GPU within a node (NVLink) and per node between nodes (network).
    intra_node_gbps: Optional[float] = None
    inter_node_gbps: Optional[float] = None
    nccl_env: Dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterConfig:
    name: str = "local"
    nodes: int = 1
    # null: a free port is chosen at launch.
    master_port: Optional[int] = None
    # SLURM settings (cluster=slurm).
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "01:00:00"
    # Seconds before the time limit at which SLURM signals the job so it can checkpoint.
    signal_seconds: int = 300
    max_requeues: int = 3
    # Shell lines run inside the job before launching (module loads, venv activation).
    setup: List[str] = field(default_factory=list)
    # Extra `#SBATCH` options, without the prefix, e.g. "--exclusive".
    sbatch_extra: List[str] = field(default_factory=list)
    # cluster=hostfile: an existing DeepSpeed hostfile ("host slots=N" lines).
    hostfile: Optional[str] = None
    # cluster=slurm: tokenize and pack in a CPU-only job that the training job waits for (sbatch
    # --dependency=afterok) instead of on the submitting host; its cores, time limit and partition (null: the
    # training job's cluster.partition).
    prepare_job: bool = False
    prepare_cpus: int = 8
    prepare_time: str = "02:00:00"
    prepare_partition: Optional[str] = None


@dataclass
class DataConfig:
    # Local file or folder (jsonl/json/txt/parquet). null: the built-in generated corpus.
    path: Optional[str] = None
    # text | alpaca | sharegpt | messages (launcher/data/formats/). Chat formats train on assistant tokens only.
    format: str = "text"
    # The record's field for format=text (the same as data.fields.text).
    text_field: str = "text"
    # Field names of the format's records, e.g. data.fields.instruction=question (defaults per format).
    fields: Dict[str, str] = field(default_factory=dict)
    # Chat formats: "auto" (the tokenizer's own template), "chatml", or a Jinja template string.
    chat_template: str = "auto"
    # Chat records longer than train.seq_len: "truncate" (keep the first seq_len tokens) or "drop"; counted.
    overlong: str = "truncate"
    # Fraction of bad records (invalid JSON, missing/empty fields) skipped; above it the data is refused.
    max_bad_fraction: float = 0.0
    # Documents in the built-in corpus.
    builtin_documents: int = 20_000
    # Packed rows are cached here (shareable by runs; on a shared filesystem for multi-node); null: <run_dir>/cache.
    cache_dir: Optional[str] = None
    # Processes tokenizing while the launcher prepares the data; null: every core of the submitting host.
    num_proc: Optional[int] = None


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    # Sequences per optimizer step. Gradient accumulation = global_batch_size / (micro_batch_size x world
    # size). null: micro_batch_size x world size (no accumulation).
    global_batch_size: Optional[int] = None
    seq_len: int = 128
    max_steps: int = 100
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    # "cosine", "linear" or "constant" after warmup.
    schedule: str = "cosine"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Max gradient norm; 0 disables clipping (DeepSpeed would otherwise default to 1.0).
    grad_clip: float = 1.0
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 5
    export_at_end: bool = False


@dataclass
class MonitorConfig:
    # DeepSpeed's monitors, written by rank 0 at every log step into the run dir: tensorboard/ (event files),
    # wandb/ (WANDB_MODE=offline keeps it local), csv/. metrics.jsonl is always written.
    tensorboard: bool = False
    wandb: bool = False
    csv: bool = False
    wandb_project: str = "launcher"
    # DeepSpeed's wall_clock_breakdown and throughput timer (it syncs the device every micro batch).
    deepspeed_timers: bool = False


@dataclass
class LauncherConfig:
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(
        default_factory=ActivationCheckpointingConfig
    )
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # Run name; the default run dir is runs/<name>. Same name = same run dir = automatic resume.
    name: str = "run"
    seed: int = 1234
    dry_run: bool = False
    # Launch even when the memory plan predicts it will not fit.
    force: bool = False
    # Show DeepSpeed's and torch's INFO/warnings on the terminal (otherwise only in <run_dir>/logs/rank<N>.log).
    verbose: bool = False
    # Extra info (plan choices, experiment notes) that tools may attach; never read by the worker.
    notes: Dict[str, Any] = field(default_factory=dict)


def register_schemas() -> None:
    ConfigStore.instance().store(name="launcher_schema", node=LauncherConfig)

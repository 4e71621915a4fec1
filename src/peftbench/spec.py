"""One run, typed: `RunSpec` is what decides its result (hashed into `config_hash`), its `runtime` is
where and how it runs (device, files, executor; not hashed). `TrainSettings` is the study's `train:`
section, the one place its keys and defaults are written.

On disk (a run's spec.json and its result.json's "config") a spec is one flat JSON object, as in earlier
versions of peftbench: `to_dict` and `from_dict` convert.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    epochs: int = 3
    batch_size: int = 16
    learning_rate: float | None = None  # None: each method's literature default (the fair protocol)
    head_learning_rate: float | None = None  # None: same as learning_rate
    weight_decay: float = 0.01
    max_length: int = 256
    warmup_ratio: float = 0.0
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    eval_batch_size: int = 64
    select_best_epoch: bool = False  # True: keep the epoch with the best validation accuracy
    precision: str = "auto"  # auto: bf16 autocast where supported (CUDA, CPUs with bf16); fp16 with loss
    # scaling on GPUs without bf16; else fp32. Or fp32, bf16, fp16
    group_by_length: bool = True  # length-bucketed batches (minimal padding); order is still random
    compile: bool | str = False  # torch.compile: true, "cudagraphs" (+ its graphs), "blocks" (each layer)
    cuda_graphs: bool = True  # CUDA: each step's forward and backward replayed from a graph per shape
    micro_batch_size: int | None = None  # None: = batch_size; smaller: gradient accumulation
    pad_to_multiple_of: int | None = None  # None: 8 (64 on CUDA or compiled whole); max_length: one shape
    base_dtype: str = "auto"  # frozen weights: auto = bf16 under bf16 autocast on CUDA, else fp32
    gradient_checkpointing: bool | str = "auto"  # auto: on only where the GPU memory budget needs it
    optimizer: str = "adamw"  # adamw (torch, fused; trained weights in fp32), adamw_bf16 (trained weights in
    # bf16, optimi's AdamW with Kahan summation), adamw_8bit or paged_adamw_8bit (bitsandbytes)
    attention_mask: str = "auto"  # auto: a ready 4D mask where a probe shows equal logits; 2d, 4d-...
    packing: bool | str = "auto"  # padding-free batches; auto: on CUDA where a probe shows equal logits
    layer_norms: str = "auto"  # auto: bf16 in and out under bf16 autocast on CUDA where a probe shows the
    # same logits (autocast's own: fp32); bf16, fp32
    sharding: str = "none"  # fsdp: weights, gradients, optimizer state sharded over gpus_per_run (FSDP2)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls)}

    @property
    def compiles_whole(self) -> bool:
        """torch.compile of the whole forward (true or "cudagraphs"), not of its repeated layers (blocks)."""
        return bool(self.compile) and self.compile != "blocks"


@dataclass(kw_only=True)
class Runtime:
    """Where and how a run executes; changing these never changes its result."""

    run_id: str
    device: str = "cpu"
    tokens_file: str | None = None
    texts_file: str | None = None  # TF-IDF runs read raw texts
    test_rows_file: str | None = None
    max_oom_retries: int = 3
    checkpoint: bool = True  # a resumable checkpoint after an epoch (not the last)
    checkpoint_every_seconds: float = 60.0  # ... once this much training has passed since the last one
    verify_reload: bool = True  # reload the saved model and compare its test predictions
    isolation: str = "process"
    executor: str = "local"
    tracking: str | None = None
    tracking_every: int = 10
    profile: bool = False
    concurrent_runs: int = 1
    plan_only: bool = False  # `peftbench plan`: probe memory and time, train nothing
    stop_after_epoch: int | None = None  # a halving search's rung: pause there (resumable), no test
    deciding_rung: bool = False  # the search is decided at this rung: its pause leaves no checkpoint
    warm: bool = False  # an lr-search trial that may take over the model the last one left (train._WARM)


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    study: str
    model: str
    model_path: str
    method: str
    label: str
    method_options: dict
    train: TrainSettings
    seed: int
    learning_rate: float | None
    role: str  # "trial" (lr search) or "final"
    evaluate_test: bool
    data: dict
    data_fingerprint: str | None = None
    data_sizes: dict | None = None
    data_origin: str | None = None
    label_names: list[str] | None = None
    task: str = "classification"  # metrics.TASKS
    metric: str = "accuracy"  # the primary metric: the best epoch is chosen on it
    device_type: str = "cpu"
    model_fingerprint: str | None = None
    pad_token_id: int | None = None
    effective_max_length: int | None = None  # max_length less the positions a soft prompt takes
    trust_remote_code: bool = False
    allow_pickle: bool = False
    world_size: int = 1
    gpu_memory_bytes: int | None = None
    results_version: int = 0
    runtime: Runtime = field(compare=False)
    config_hash: str = field(default="", compare=False)  # of the spec as planned (`planned`)

    def hashed(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("runtime", "config_hash")}
        d["train"] = asdict(self.train)
        for key, default in (("task", "classification"), ("metric", "accuracy")):
            if d[key] == default:  # hashes from before these keys stay, and so do their finished runs
                del d[key]
        for key in ("packing", "layer_norms"):  # as before these keys: the hashes of finished runs stay
            if d["train"][key] == "auto":
                del d["train"][key]
        return d

    def planned(self) -> RunSpec:
        """This spec with its hash set; later changes (an OOM retry's micro-batch) keep the plan's hash."""
        return dataclasses.replace(self, config_hash=config_hash(self.hashed()))

    def warm_key(self) -> str:
        """What a warm trial shares with the trial before it in its process: all but its seed and rate."""
        d = self.hashed()
        d.update(seed=None, learning_rate=None, train={**d["train"], "learning_rate": None})
        return config_hash({**d, "device": self.runtime.device})

    def with_train(self, **changes) -> RunSpec:
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))

    def with_runtime(self, **changes) -> RunSpec:
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **changes))

    def to_dict(self) -> dict:
        return {**self.hashed(), "config_hash": self.config_hash, **asdict(self.runtime)}

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        """A spec from its flat JSON form; keys this version does not know (from older or newer results)
        are ignored, missing runtime keys take their defaults."""
        own = {f.name for f in fields(cls)} - {"runtime", "train"}
        rt = {f.name for f in fields(Runtime)}
        train_known = {f.name for f in fields(TrainSettings)}
        return cls(
            **{k: v for k, v in d.items() if k in own},
            train=TrainSettings(**{k: v for k, v in d["train"].items() if k in train_known}),
            runtime=Runtime(**{k: v for k, v in d.items() if k in rt}),
        )


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

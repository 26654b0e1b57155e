"""Training one modality's adapter: stage 1 (alignment) and stage 2 (instruction tuning with an LLM adapter).

Stage 1 trains the projector on (signal, caption) pairs, encoder and LLM frozen. Stage 2 goes on from a
stage-1 projector and adds an adapter on the LLM of one of the stage-2 methods (``modalink.methods``: LoRA by
default), trained together with the projector on instructions: describe questions plus yes/no checks
(``data.instruction``).

The loss is next-token cross-entropy on the answer tokens only, and logits are computed only at those
positions (the LLM head over 49k tokens would otherwise dominate). Encoder features come from the cache.
Checkpoints (projector, optimizer, step, RNG) are safetensors, written atomically every
``checkpoint_every`` steps: kill -9 and ``resume`` loses at most that interval.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache

from modalink.data import caption, instruction
from modalink.data import questions as describe_questions
from modalink.engines.transformers import TransformersEngine
from modalink.methods import METHODS
from modalink.modality import get as get_modality
from modalink.progress import progress
from modalink.projectors import ProjectorConfig, build_projector, pad_features, project
from modalink.prompt import Media, Message, build_prompt


@dataclass
class AlignConfig:
    modality: str
    projector: dict = field(default_factory=dict)  # overrides of DEFAULT_PROJECTORS[modality]
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 100
    eval_items: int = 60
    checkpoint_every: int = 20
    init_from: str | None = None  # registry version to start from ("current", "v3"); None = fresh init
    stage: int = 1  # 2 = an LLM adapter (``method``) + projector, on instructions
    method: str = "lora"  # stage 2: one of ``modalink.methods.METHODS``
    method_args: dict = field(default_factory=dict)  # the method's settings (lora: ``LoraSettings``' fields)
    method_lr: float | None = None  # stage 2: peak learning rate of the LLM adapter (None: the method's default)
    checks: float = 0.3  # stage 2: share of yes/no check instructions
    order: float = 0.0  # video: share of questions about what comes first, last or at all (both stages)
    ground: int = 0  # epochs of word grounding before stage 1 (``train.ground``; a fresh mlp projector only)
    balance: bool = False  # draw items by how many classes their label names (video: 1, 2 and 3 items alike)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.method not in METHODS:
            raise ValueError(f"unknown stage-2 method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method_lr is None:
            from modalink.methods import default_lr

            self.method_lr = default_lr(self.method)


@dataclass
class Batch:
    """One training batch: the rows after their prompt heads, and which head each row continues."""

    heads: list[tuple[int, ...]]  # distinct token ids before the media (system prompt + question)
    row_head: list[int]  # index into ``heads`` per row
    x: torch.Tensor  # [B, L, d] media embeddings + the prompt tail + the answer, right-padded
    mask: torch.Tensor  # [B, L]
    where: list[torch.Tensor]  # positions (in x) that predict answer tokens
    targets: list[torch.Tensor]


class Batcher:
    """Turns (features, question, answer) into padded LLM inputs; the projector output is spliced in."""

    def __init__(self, engine: TransformersEngine, system_prompt: str | None):
        self.engine, self.tok, self.system = engine, engine.tokenizer, system_prompt
        self._prompt_ids: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self.end_ids = (
            self.tok("<|im_end|>", add_special_tokens=False).input_ids
            if "<|im_end|>" in (self.tok.eos_token or "")
            else [self.tok.eos_token_id]
        )

    def prompt_ids(self, modality: str, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the modality embeddings for this question (cached)."""
        key = (modality, question)
        if key not in self._prompt_ids:
            segs = build_prompt(
                self.tok, [Message("user", [question, Media(modality, torch.zeros(1, 1))])], self.system
            )
            before, _, after = segs
            enc = lambda s: self.tok(s, add_special_tokens=False).input_ids  # noqa: E731
            self._prompt_ids[key] = (enc(before), enc(after))
        return self._prompt_ids[key]

    def build(self, media: list[torch.Tensor], modality: str, questions: list[str], answers: list[str]) -> Batch:
        emb = self.engine.embedding
        heads: dict[tuple[int, ...], int] = {}
        rows, row_head, targets, where = [], [], [], []
        for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
            before, after = self.prompt_ids(modality, q)
            ans = self.tok(a, add_special_tokens=False).input_ids + self.end_ids
            row_head.append(heads.setdefault(tuple(before), len(heads)))
            x = torch.cat([media[i].to(emb.weight.dtype), emb(torch.tensor(after + ans))])
            start = len(media[i]) + len(after)  # first answer position
            where.append(torch.arange(start - 1, start - 1 + len(ans)))  # positions that predict answer tokens
            targets.append(torch.tensor(ans))
            rows.append(x)
        width = max(r.shape[0] for r in rows)
        x = torch.zeros(len(rows), width, rows[0].shape[1], dtype=rows[0].dtype)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
        return Batch(list(heads), row_head, x, mask, where, targets)


class HeadCache:
    """Keys/values of the prompt heads, computed once per distinct head instead of once per row.

    Every row starts with the system prompt and one of a few questions: about half of its tokens. With
    the LLM frozen (stage 1) a head's KV never changes and is computed once per run; with a LoRA in
    training (stage 2) it is recomputed each step, with gradients, but for the few distinct heads only.
    """

    def __init__(self, engine: TransformersEngine, adapter: str | None = None):
        self.engine, self.adapter = engine, adapter
        self._frozen: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def soft(self) -> torch.Tensor | None:
        """The adapter's soft prompt (prompt tuning): read before each head, as the engine serves it."""
        return self.engine.soft_prompt(self.adapter)

    def _compute(self, ids: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = self.engine.embedding(torch.tensor([ids]))
        if (soft := self.soft) is not None:
            x = torch.cat([soft.to(x.dtype)[None], x], 1)
        cache = self.engine.model.model(inputs_embeds=x, use_cache=True).cache
        return [(layer.keys, layer.values) for layer in cache.layers]

    def kv(self, ids: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if any(p.requires_grad for p in self.engine.model.parameters()):
            return self._compute(ids)
        if ids not in self._frozen:
            with torch.no_grad():
                self._frozen[ids] = self._compute(ids)
        return self._frozen[ids]

    def cache_for(self, batch: Batch) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """(KV cache [B, heads, P, hd] with heads left-padded to P, their mask [B, P], their lengths [B])."""
        kvs = [self.kv(h) for h in batch.heads]
        soft = self.soft
        extra = 0 if soft is None else soft.shape[0]
        width = max(len(h) for h in batch.heads) + extra
        rows = torch.tensor(batch.row_head)
        cache = DynamicCache()
        pad = lambda t: F.pad(t, (0, 0, width - t.shape[2], 0))  # noqa: E731  (left-pad the sequence axis)
        for layer in range(len(kvs[0])):
            keys = torch.cat([pad(kv[layer][0]) for kv in kvs])[rows]
            values = torch.cat([pad(kv[layer][1]) for kv in kvs])[rows]
            cache.update(keys, values, layer)
        lengths = torch.tensor([len(batch.heads[r]) + extra for r in batch.row_head])
        mask = (torch.arange(width) >= width - lengths[:, None]).long()
        return cache, mask, lengths


def answer_loss(engine: TransformersEngine, heads: HeadCache, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the answer tokens; the LM head runs at answer positions only."""
    cache, head_mask, lengths = heads.cache_for(batch)
    positions = lengths[:, None] + torch.arange(batch.x.shape[1])
    hidden = engine.model.model(
        inputs_embeds=batch.x, attention_mask=torch.cat([head_mask, batch.mask], 1), position_ids=positions,
        cache=cache, use_cache=True,
    ).last_hidden_state  # fmt: skip
    h = torch.cat([hidden[i, w] for i, w in enumerate(batch.where)])
    logits = engine.model.lm_head(h)
    return F.cross_entropy(logits.float(), torch.cat(batch.targets))


def plain_answer_loss(engine: TransformersEngine, batch: Batch) -> torch.Tensor:
    """``answer_loss`` the plain way, each row with its own head tokens (the reference for tests and bench); run it
    under ``engine.route(adapter)`` as ``loss_on`` runs ``answer_loss``."""
    emb = engine.embedding
    rows, where = [], []
    adapter = engine.router.rows if isinstance(engine.router.rows, str) else None
    soft = engine.soft_prompt(adapter)
    for i, r in enumerate(batch.row_head):
        head = emb(torch.tensor(batch.heads[r]))
        if soft is not None:
            head = torch.cat([soft.to(head.dtype), head])
        n = int(batch.mask[i].sum())
        rows.append(torch.cat([head, batch.x[i, :n]]))
        where.append(batch.where[i] + len(head))
    x, mask = pad_features(rows)
    hidden = engine.model.model(inputs_embeds=x, attention_mask=mask.long()).last_hidden_state
    logits = engine.model.lm_head(torch.cat([hidden[i, w] for i, w in enumerate(where)]))
    return F.cross_entropy(logits.float(), torch.cat(batch.targets))


def _atomic_save(tensors: dict, meta: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AlignTrainer:
    def __init__(
        self, cfg: AlignConfig, engine: TransformersEngine, d_in: int, train: list[tuple[dict, torch.Tensor]],
        val: list[tuple[dict, torch.Tensor]], run_dir: Path, system_prompt: str | None = None,
        init: nn.Module | None = None, init_adapter: dict[str, torch.Tensor] | None = None,
    ):  # fmt: skip
        self.cfg, self.engine, self.train, self.val, self.run_dir = cfg, engine, train, val, Path(run_dir)
        torch.manual_seed(cfg.seed)
        if init is not None:  # continue from a published version (its own recipe wins)
            self.projector = init
        else:
            pcfg = {**get_modality(cfg.modality).projector, **cfg.projector}
            self.projector = build_projector(ProjectorConfig(d_in=d_in, d_llm=engine.hidden_size, **pcfg))
        if cfg.stage == 1 and engine.adapters:
            raise ValueError("stage 1 trains against the bare LLM: use an engine without LLM adapters")
        groups = [{"params": list(self.projector.parameters()), "scale": 1.0}]
        self.adapter: str | None = None  # the LLM adapter being trained (stage 2)
        if cfg.stage == 2:
            self.adapter = f"{cfg.modality}-training"
            adapter_params = engine.train_adapter(self.adapter, cfg.method, cfg.method_args)
            if init_adapter is not None:
                engine.load_adapter_state(self.adapter, init_adapter)
            self.trainable_llm = sum(p.numel() for p in adapter_params)
            groups.append({"params": adapter_params, "scale": cfg.method_lr / cfg.lr, "weight_decay": 0.0})
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.batcher = Batcher(engine, system_prompt)
        self.heads = HeadCache(engine, self.adapter)
        self.step = 0
        self.rng = random.Random(cfg.seed)
        self.history: list[dict] = []
        self.step_seconds: list[float] = []  # time of each optimizer step this process ran (not evaluation)
        groups: dict[int, list] = {}  # ``balance``: items by how many classes their label names
        for item in train if cfg.balance else ():
            groups.setdefault(len(str(item[0].get("label", "")).split("|")), []).append(item)
        self.groups = [groups[k] for k in sorted(groups)]
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint.safetensors"

    def save_checkpoint(self) -> None:
        tensors = {f"projector.{k}": v.detach().contiguous() for k, v in self.projector.state_dict().items()}
        if self.adapter:
            tensors.update({f"llm.{k}": v for k, v in self.adapter_state()[0].items()})
        opt = self.opt.state_dict()
        for pid, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
        meta = {"step": self.step, "rng": self.rng.getstate()[1], "config": asdict(self.cfg), "history": self.history,
                "torch_rng": torch.get_rng_state().tolist()}  # fmt: skip
        _atomic_save(tensors, meta, self.checkpoint)

    def resume(self) -> bool:
        if not self.checkpoint.exists():
            return False
        from safetensors import safe_open

        with safe_open(str(self.checkpoint), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        was = meta["config"]
        if (was.get("stage", 1), was["modality"], was.get("method", "lora")) != (self.cfg.stage, self.cfg.modality,
                                                                                self.cfg.method):  # fmt: skip
            raise ValueError(
                f"{self.checkpoint} is a {was['modality']} stage-{was.get('stage', 1)} "
                f"{was.get('method', 'lora') if was.get('stage', 1) == 2 else ''} checkpoint: train with --restart to "
                "start over"
            )
        tensors = load_file(str(self.checkpoint))
        self.projector.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("projector.")})
        if self.adapter:
            self.engine.load_adapter_state(self.adapter, {k[4:]: v for k, v in tensors.items() if k[:4] == "llm."})
        opt = self.opt.state_dict()
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                opt["state"].setdefault(int(pid), {})[name] = v
        self.opt.load_state_dict(opt)
        self.step, self.history = meta["step"], meta["history"]
        self.rng.setstate((3, tuple(meta["rng"]), None))
        torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
        return True

    def adapter_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.engine.adapter_state(self.adapter)

    # -- training ----------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        return c.lr * 0.5 * (1 + math.cos(math.pi * (step - c.warmup) / max(1, c.steps - c.warmup)))

    def loss_on(self, items: list[tuple[dict, torch.Tensor]], rng: random.Random) -> torch.Tensor:
        x, mask = pad_features([f.float() for _, f in items])
        media = project(self.projector, x, mask)
        m = self.cfg.modality
        if self.cfg.stage == 1 and not self.cfg.order:  # a describe question, then a fresh answer template
            questions = [rng.choice(describe_questions(m)) for _ in items]
            # a curated pair (no label) is learned as written: e.g. a caption a user corrected
            answers = [caption(m, row["label"], rng) if "label" in row else row["caption"] for row, _ in items]
        else:
            checks = self.cfg.checks if self.cfg.stage == 2 else 0.0
            pairs = [instruction(m, row["label"], rng, checks, self.cfg.order) if "label" in row
                     else (rng.choice(describe_questions(m)), row["caption"]) for row, _ in items]  # fmt: skip
            questions, answers = [q for q, _ in pairs], [a for _, a in pairs]
        with self.engine.route(self.adapter):
            return answer_loss(self.engine, self.heads, self.batcher.build(media, m, questions, answers))

    def val_loss(self) -> float:
        rng = random.Random(1234)
        items = self.val[: self.cfg.eval_items]
        self.projector.eval()
        with torch.no_grad():
            losses = [self.loss_on(items[i : i + 16], rng).item() for i in range(0, len(items), 16)]
        self.projector.train()
        return sum(losses) / len(losses)

    def draw(self, n: int) -> list[tuple[dict, torch.Tensor]]:
        """A training batch: ``n`` distinct items, or with ``balance`` items drawn group by group, each group (items
        whose label names as many classes: a video's one, two or three items) as likely as the others."""
        if not self.cfg.balance:
            return self.rng.sample(self.train, min(n, len(self.train)))
        return [self.rng.choice(self.rng.choice(self.groups)) for _ in range(n)]

    def fit(self) -> nn.Module:
        c = self.cfg
        self.projector.train()
        bar = progress(total=c.steps, initial=self.step, desc=f"align {c.modality}", unit="step")
        t0, seen = time.time(), 0
        while self.step < c.steps:
            step_start = time.perf_counter()
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step) * g["scale"]
            batch = self.draw(c.batch_size)
            loss = self.loss_on(batch, self.rng)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.step += 1
            self.step_seconds.append(time.perf_counter() - step_start)
            seen += len(batch)
            entry = {"step": self.step, "loss": round(loss.item(), 4)}
            if self.step % c.eval_every == 0 or self.step == c.steps:
                entry["val_loss"] = round(self.val_loss(), 4)
            self.history.append(entry)
            bar.set_postfix(loss=f"{loss.item():.3f}", **({"val": entry["val_loss"]} if "val_loss" in entry else {}),
                            ips=f"{seen / (time.time() - t0):.1f}")  # fmt: skip
            bar.update(1)
            if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                self.save_checkpoint()
        bar.close()
        return self.projector.eval()

    @torch.no_grad()
    def answers(self, items: list[tuple[dict, torch.Tensor]], question: str, max_new_tokens: int = 24) -> list[str]:
        """Greedy free-text answers from cached features (the same prompt as the assistant builds)."""
        from modalink.evaluate import answer_media

        out = []
        for i in range(0, len(items), 32):
            chunk = items[i : i + 32]
            x, mask = pad_features([f.float() for _, f in chunk])
            media = project(self.projector.eval(), x, mask)
            out += answer_media(self.engine, self.cfg.modality, media, [question] * len(chunk),
                                self.batcher.system, max_new_tokens, adapter=self.adapter)  # fmt: skip
        return out

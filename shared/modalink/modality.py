"""Modalities as plugins: one small contract (``Modality``) and the registry that finds them.

A modality is a package that exposes a ``Modality`` and registers it under the Python entry-point group
``modalink.modalities``; the four built-ins (``modalink.builtins``) are registered the same way in this project's
``pyproject.toml``. Everything that needs the list of modalities (routing, ports, ``modalink up``, the workers,
training, evaluation, the CLI, the playground) reads this registry instead of a hard-coded list::

    [project.entry-points."modalink.modalities"]
    power = "modalink_power:MODALITY"

A plugin that breaks the contract (a name that is not a safe identifier, a name two packages claim, an object
that is not a ``Modality``, features of the wrong shape) is refused with a ``PluginError`` that names it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modalink.encoders.base import Encoder

Settings = Any  # modalink.config.Settings, not imported: config imports ports, which imports this module

GROUP = "modalink.modalities"
BUILTIN = ("image", "audio", "imu", "video")  # their order, then plugins by name
BUILTIN_PORTS = {"image": 8000, "audio": 8010, "imu": 8020, "video": 8030}  # Triton HTTP port of each encoder
PLUGIN_PORTS = 8040  # the first plugin's (in name order), then every 10
NAME_RE = re.compile(r"[a-z][a-z0-9]{0,31}")  # safe as a Triton model, Kubernetes, queue and env name
INPUTS = ("file", "tensor")


class PluginError(RuntimeError):
    """A modality plugin that breaks the contract: refused at start, with what is wrong and which plugin."""


@dataclass(frozen=True)
class Modality:
    """What a modality brings. Only ``name``, ``load_encoder``, ``questions``, ``answers`` and ``words`` are required.

    - ``load_encoder(settings)``: the frozen encoder (``modalink.encoders.base.Encoder``): ``decode`` checks the raw
      input and its size limits before any heavy work (``InputError`` for bad input), ``encode`` returns features
      ``[n, feature_dim]`` per item. An encoder service calls both from two threads at once (``--instances``):
      keep no per-call state on the encoder.
    - ``input``: how raw input arrives: ``"file"`` (encoded bytes: a Triton BYTES ``[1]`` input, a file or a data
      URL on the HTTP routes) or ``"tensor"`` (float32 of ``tensor_rank`` axes: Triton FP32, ``.npy`` files).
    - ``questions`` (the first is the default question), ``answers`` (caption templates with ``{label}``),
      ``checks`` (yes/no templates with ``{x}``, stage-2 instructions) and ``words`` (the class words free-text
      evaluation looks for, with ``synonyms``: other forms an answer may name a word by, e.g. ``{"television":
      ("television", "tv")}``); ``describe`` turns a label into the phrase the templates use (default: the label).
    - ``projector``: the default projector config (``modalink.projectors.ProjectorConfig`` fields).
    - ``file_types``: file suffixes the CLI and the playground accept; ``mime``: the type a file is sent as.
    - ``build_data(out, cfg)``: writes ``out/<name>/{train,val,test}.jsonl`` manifests (``modalink data build``);
      ``write_sample(out)``: writes a demo input and returns ``{"path", "truth"}`` (``modalink samples``).
    - ``preprocessing(settings)``: the settings that change its embeddings for the same input (the embedding
      cache's key holds them).
    - ``baseline(data_dir)``: a classical classifier of the field trained on the train split and scored on the
      test split, ``(name, accuracy)``: ``modalink eval --report`` puts it next to the assistant's accuracy.
    """

    name: str
    load_encoder: Callable[[Settings], Encoder]
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    words: tuple[str, ...]
    projector: dict = field(default_factory=lambda: {"kind": "mlp", "n_tokens": 8})
    checks: tuple[str, ...] = ()
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    describe: Callable[[str], str] | None = None
    input: str = "file"
    tensor_rank: int = 2
    file_types: tuple[str, ...] = ()
    mime: str = "application/octet-stream"
    build_data: Callable[[Path, Any], dict[str, int]] | None = None
    write_sample: Callable[[Path], dict] | None = None
    preprocessing: Callable[[Settings], dict] | None = None
    baseline: Callable[[Path], tuple[str, float]] | None = None

    def validate(self) -> Modality:
        """Raise ``PluginError`` for a spec that breaks the contract (``registry`` calls it on every plugin)."""
        where = f"modality plugin {self.name!r}"
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise PluginError(f"{where}: the name must be a lower-case identifier ([a-z][a-z0-9]*, 32 at most)")
        if not callable(self.load_encoder):
            raise PluginError(f"{where}: load_encoder must be callable (settings -> Encoder)")
        for what in ("questions", "answers", "words"):
            value = getattr(self, what)
            if not value or isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise PluginError(f"{where}: {what} must be a non-empty tuple of strings")
        if not all("{label}" in a for a in self.answers):
            raise PluginError(f"{where}: every answer template must contain {{label}}")
        if stray := sorted(set(self.synonyms) - set(self.words)):
            raise PluginError(f"{where}: synonyms must be keyed by class words, not {stray}")
        if not all("{x}" in c for c in self.checks):
            raise PluginError(f"{where}: every check template must contain {{x}}")
        if self.input not in INPUTS:
            raise PluginError(f"{where}: input must be one of {INPUTS}, got {self.input!r}")
        if not all(isinstance(s, str) and s.startswith(".") for s in self.file_types):
            raise PluginError(f"{where}: file_types must be suffixes such as '.npy'")
        from modalink.projectors import ProjectorConfig

        try:
            ProjectorConfig.from_dict(dict(self.projector))
        except (TypeError, ValueError) as e:
            raise PluginError(f"{where}: bad default projector config: {e}") from None
        return self

    def phrase(self, label: str) -> str:
        return self.describe(label) if self.describe else label

    def check_features(self, encoder: Encoder, feats: list) -> list:
        """The encoder's features, refused (``PluginError``) unless each is ``[n, feature_dim]`` with n >= 1."""
        d = getattr(encoder, "feature_dim", None)
        for f in feats:
            shape = tuple(getattr(f, "shape", ()))
            if len(shape) != 2 or shape[0] < 1 or shape[1] != d:
                raise PluginError(f"modality plugin {self.name!r}: its encoder returned features of shape {shape}; "
                                  f"the contract is [n, feature_dim] = [n, {d}]")  # fmt: skip
        return feats

    def self_check(self, encoder: Encoder) -> None:
        """A service's start check: the plugin's sample through ``decode`` and ``encode``, its features checked, so
        a plugin that breaks the contract fails at start rather than on its first request (no sample: no check)."""
        if self.write_sample is None:
            return
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            sample = self.write_sample(Path(tmp))
            self.check_features(encoder, encoder.encode([encoder.decode(sample["path"])]))


def _builtin_entry_points() -> dict[str, EntryPoint]:
    return {n: EntryPoint(n, f"modalink.builtins:{n.upper()}", GROUP) for n in BUILTIN}


@functools.cache
def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        if not NAME_RE.fullmatch(ep.name):
            raise PluginError(f"modality plugin {ep.name!r} ({ep.value}): the name must be a lower-case identifier "
                              "([a-z][a-z0-9]*, 32 at most)")  # fmt: skip
        if ep.name in found and found[ep.name].value != ep.value:
            raise PluginError(f"modality {ep.name!r} is registered twice ({found[ep.name].value} and {ep.value}): "
                              "uninstall one of the packages")  # fmt: skip
        found[ep.name] = ep
    # Built-ins also when this package runs from a source tree without its installed metadata.
    builtin = {n: found.pop(n, ep) for n, ep in _builtin_entry_points().items()}
    return builtin | dict(sorted(found.items()))


def names() -> tuple[str, ...]:
    """Every registered modality: the built-ins, then plugins by name (entry-point names; nothing is imported)."""
    return tuple(_entry_points())


@functools.cache
def get(name: str) -> Modality:
    """The registered ``Modality`` called ``name`` (loaded and validated once); ``InputError`` if there is none."""
    eps = _entry_points()
    if name not in eps:
        from modalink.errors import InputError

        raise InputError(f"unknown modality {name!r}; expected one of {', '.join(eps)}")
    try:
        spec = eps[name].load()
    except Exception as e:  # noqa: BLE001  (a plugin's import error, of any type)
        raise PluginError(f"modality plugin {name!r} ({eps[name].value}) failed to import: {e}") from e
    if not isinstance(spec, Modality):
        raise PluginError(f"modality plugin {name!r} ({eps[name].value}) is a {type(spec).__name__}, not a "
                          "modalink.modality.Modality")  # fmt: skip
    if spec.name != name:
        raise PluginError(f"modality plugin registered as {name!r} names itself {spec.name!r}")
    return spec.validate()


def registry() -> dict[str, Modality]:
    """Every modality's spec (imports every plugin): what services check at start."""
    return {n: get(n) for n in names()}


def ports() -> dict[str, int]:
    """Triton HTTP port of each modality's encoder service (gRPC and metrics are the next two): the built-ins'
    own, then plugins in slots of 10 in name order (from the names alone: every process agrees without importing
    a plugin)."""
    out = dict(BUILTIN_PORTS)
    for i, n in enumerate(n for n in names() if n not in BUILTIN_PORTS):
        out[n] = PLUGIN_PORTS + 10 * i
    return out

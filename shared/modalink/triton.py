"""The encoder model as Triton sees it: named numpy tensors in and out, one batch at a time.

Shared by the PyTriton service (``services/encoder/server.py``) and the classic model repository's
python backend (``services/encoder/model_repository``), so both serve the same contract:

- model ``<modality>_encoder``; input ``data``: image/audio = BYTES [1] (an encoded file: PNG/JPEG/...,
  WAV/FLAC/OGG), video = BYTES [n] (one encoded file, or n encoded frames), imu = FP32 [channels, time]; a plugin
  modality's BYTES [1] (``input="file"``) or FP32 of its ``tensor_rank`` axes (``input="tensor"``);
- outputs ``embeddings`` FP32 [n_tokens, d_llm] (already projected into the LLM's space), ``tokens`` INT32 [1]
  (how many rows of ``embeddings`` are the item's: fewer than n_tokens for a short item of a projector that does
  not stretch, a one-frame video; the rows past it are zero padding), ``adapter_version`` BYTES [1] and
  ``error`` BYTES [1] (empty when the item is fine).

Triton fails a whole batch when the model raises, so one bad item must not raise while it shares a
batch with good ones: its row carries the message in ``error`` (and zero embeddings). A batch in which
every item is bad raises, so a lone bad request gets an ordinary Triton error with the message.
"""

from __future__ import annotations

import numpy as np

from modalink.embedder import Embedder
from modalink.errors import InputError
from modalink.modality import BUILTIN
from modalink.modality import get as get_modality

INVALID_INPUT = "invalid input: "  # prefixes bad-input errors, so clients can tell them from failures


def model_name(modality: str) -> str:
    return f"{modality}_encoder"


def input_spec(modality: str) -> tuple[type, tuple[int, ...]]:
    """(numpy dtype, shape without the batch axis) of the ``data`` input: a tensor modality's FP32 of its rank
    (IMU [channels, time]), a file modality's one encoded file (a video's, or its frames)."""
    spec = get_modality(modality)
    if spec.input == "tensor":
        return np.float32, (-1,) * spec.tensor_rank
    return np.bytes_, (-1,) if modality == "video" else (1,)


def _raw(modality: str, row: np.ndarray):
    if get_modality(modality).input == "tensor":
        return np.asarray(row, dtype=np.float32)
    items = [bytes(x) for x in row.reshape(-1)]
    if modality == "video" and len(items) > 1:
        return items  # frames
    if len(items) != 1:
        raise InputError(f"{modality} input 'data' must hold one encoded file, got {len(items)} elements")
    return items[0]


class EncoderModel:
    """Decode each item on its own (bad ones are reported, not raised), then encode + project the rest at once."""

    def __init__(self, embedder: Embedder, modality: str):
        self.embedder, self.modality = embedder, modality
        projector, _ = self.embedder.projector(modality)  # loads encoder + projector now, not on a request
        if modality not in BUILTIN:  # a plugin that breaks the contract fails here, at start
            get_modality(modality).self_check(self.embedder.encoder(modality))
        self.n_tokens = projector.cfg.n_tokens
        self.d_llm = self.embedder.d_llm

    def infer(self, data: np.ndarray) -> dict[str, np.ndarray]:
        self.embedder.refresh(self.modality)  # hot reload between batches
        decoded, errors = [], []
        for row in data:
            try:
                decoded.append(self.embedder.decode(self.modality, [_raw(self.modality, row)])[0])
                errors.append("")
            except InputError as e:
                decoded.append(None)
                errors.append(str(e))
        good = [i for i, d in enumerate(decoded) if d is not None]
        if not good:
            raise InputError("; ".join(dict.fromkeys(errors)))
        embs, version = self.embedder.embed(self.modality, [decoded[i] for i in good], decoded=True)
        out = np.zeros((len(data), self.n_tokens, self.d_llm), dtype=np.float32)
        tokens = np.zeros((len(data), 1), dtype=np.int32)
        for i, e in zip(good, embs, strict=True):
            out[i, : len(e)], tokens[i] = e.numpy(), len(e)
        n = len(data)
        return {
            "embeddings": out,
            "tokens": tokens,
            "adapter_version": np.array([[version.encode()]] * n, dtype=np.bytes_),
            "error": np.array([[e.encode()] for e in errors], dtype=object),
        }


class TritonPythonModel:
    """Triton python backend model (the classic model repository's ``model.py`` imports this class).

    The model's name (``<modality>_encoder``) picks the modality. Triton hands a list of requests: same-shape
    ones are concatenated into one batch. Unlike PyTriton, the python backend can fail requests one by
    one, so a bad item gets its own Triton error and its batch-mates their embeddings.
    """

    def initialize(self, args: dict) -> None:
        from modalink.config import Settings

        modality = args["model_name"].removesuffix("_encoder")
        self.model = EncoderModel(Embedder(Settings()), modality)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        arrays = [pb_utils.get_input_tensor_by_name(r, "data").as_numpy() for r in requests]
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape[1:], []).append(i)
        for idx in groups.values():
            data = np.concatenate([arrays[i] for i in idx])
            try:
                out = self.model.infer(data)
            except InputError as e:
                out = {"error": np.array([[str(e).encode()]] * len(data), dtype=object)}
            row = 0
            for i in idx:
                n = len(arrays[i])
                errors = [e for e in out["error"][row : row + n, 0] if e]
                if errors:
                    msg = INVALID_INPUT + (errors[0].decode() if isinstance(errors[0], bytes) else str(errors[0]))
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))
                else:
                    responses[i] = pb_utils.InferenceResponse(
                        [pb_utils.Tensor(k, v[row : row + n]) for k, v in out.items()]
                    )
                row += n
        return responses

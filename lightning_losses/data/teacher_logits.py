r"""Offline teacher logits: the teacher's top-k log-probabilities per token, computed once and memory-mapped.

Distilling a large teacher live keeps it in training memory and runs its forward every step. Instead,
:func:`precompute_teacher_logits` runs the teacher once over the training token ids and stores, for every sequence
``i`` and position ``t``, the ``k`` largest entries of :math:`\log\operatorname{softmax}(z^t_{i,t} / T)` (the
distribution of token ``t + 1``) and their ids. Training then reads them back with :class:`TeacherLogitsDataset`
(the teacher is never loaded) and applies
:class:`~lightning_losses.losses.sparse_distillation.SparseGeneralizedJSDLoss`, which keeps the rest of the
vocabulary as one bucket. Storage per token: ``k`` values (2 bytes in float16, 4 in float32) and ``k`` int32 ids.

A cache is a folder with three files:

* ``values.npy`` ``(N, T, k)`` float16 or float32 and ``indices.npy`` ``(N, T, k)`` int32 (numpy ``.npy`` files,
  opened as memory maps, so only the rows a batch reads are paged in);
* ``manifest.json``: sizes, dtype, temperature, the rows completed so far, and the **key** of the cache: a SHA-256
  of the token ids (and attention mask), one of the teacher (:func:`teacher_fingerprint`: its configuration and
  every parameter and buffer), and of ``k`` / temperature / dtype.

Precomputation is **resumable**: rows are written batch by batch and the manifest records the completed rows after
each batch is flushed (the manifest is replaced atomically), so an interrupted run resumed with the same arguments
continues where it stopped and produces the same files as an uninterrupted one. A cache whose key does not match
the data (or the teacher, when given) is **refused** with :class:`StaleTeacherCacheError`, both when precomputing
into an existing folder and when opening it for training.

Offline teacher logits were requested from TRL (huggingface/trl issues #2255 and #3055) and Liger-Kernel (#441).

Example:
    >>> import tempfile, torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> teacher = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40, n_positions=16))
    >>> ids = torch.randint(0, 40, (6, 10))
    >>> folder = tempfile.mkdtemp()
    >>> cache = precompute_teacher_logits(teacher, ids, folder, k=4, batch_size=4)
    >>> cache.shape, cache.complete
    ((6, 10, 4), True)
    >>> item = TeacherLogitsDataset(cache, ids)[0]
    >>> sorted(item), tuple(item["teacher_log_probs"].shape)
    (['attention_mask', 'index', 'input_ids', 'labels', 'teacher_indices', 'teacher_log_probs'], (10, 4))
    >>> TeacherLogitsDataset(cache, ids.flip(0))
    Traceback (most recent call last):
    ...
    lightning_losses.data.teacher_logits.StaleTeacherCacheError: The teacher-logits cache ... for other token ids ...
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_losses.functional.sparse_distillation import TopKLogProbs, topk_teacher_log_probs
from lightning_losses.utilities.checks import check_choice, check_hyperparameter, check_int

__all__ = [
    "StaleTeacherCacheError",
    "TeacherLogitsCache",
    "TeacherLogitsDataset",
    "data_fingerprint",
    "precompute_teacher_logits",
    "teacher_fingerprint",
]

_FORMAT = "lightning-losses/teacher-logits"
_VERSION = 1
_MANIFEST, _VALUES, _INDICES = "manifest.json", "values.npy", "indices.npy"


class StaleTeacherCacheError(ValueError):
    """A teacher-logits cache does not belong to the token ids, the teacher or the settings it is used with."""


def _sha256_tensor(digest: Any, tensor: Tensor) -> None:
    t = tensor.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
        t = t.view(torch.int16)
    array = np.ascontiguousarray(t.cpu().numpy())
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())


def data_fingerprint(token_ids: Tensor, attention_mask: Tensor | None = None) -> str:
    """SHA-256 of the token ids (as int64) and, when given, of the attention mask (as int8).

    Example:
        >>> a = data_fingerprint(torch.tensor([[1, 2, 3]]))
        >>> b = data_fingerprint(torch.tensor([[1, 2, 3]], dtype=torch.int32))
        >>> c = data_fingerprint(torch.tensor([[1, 2, 4]]))
        >>> a == b, a == c
        (True, False)
    """
    digest = hashlib.sha256()
    _sha256_tensor(digest, token_ids.long())
    if attention_mask is not None:
        digest.update(b"mask")
        _sha256_tensor(digest, attention_mask.to(torch.int8))
    return digest.hexdigest()


def teacher_fingerprint(teacher: nn.Module) -> str:
    """SHA-256 of a teacher: its class, its configuration (``config.to_json_string()`` for transformers models) and
    the name, dtype, shape and bytes of every entry of its ``state_dict``.

    Example:
        >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> teacher_fingerprint(a) == teacher_fingerprint(a), teacher_fingerprint(a) == teacher_fingerprint(b)
        (True, False)
    """
    digest = hashlib.sha256(type(teacher).__qualname__.encode())
    config = getattr(teacher, "config", None)
    to_json = getattr(config, "to_json_string", None)
    if callable(to_json):
        digest.update(str(to_json(use_diff=False)).encode())
    for name, value in teacher.state_dict().items():
        digest.update(name.encode())
        _sha256_tensor(digest, value)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Key:
    data_hash: str
    teacher_hash: str
    k: int
    temperature: float
    value_dtype: str


def _check_token_ids(token_ids: Tensor, attention_mask: Tensor | None) -> None:
    if not isinstance(token_ids, Tensor) or token_ids.ndim != 2 or token_ids.is_floating_point():
        raise ValueError(
            "`token_ids` must be an integer tensor of shape (num_sequences, seq_len) (pad sequences to one length), "
            f"got {type(token_ids).__name__}{'' if not isinstance(token_ids, Tensor) else tuple(token_ids.shape)}."
        )
    if attention_mask is not None and (
        not isinstance(attention_mask, Tensor) or attention_mask.shape != token_ids.shape
    ):
        raise ValueError(
            f"`attention_mask` must be a tensor of the token ids' shape {tuple(token_ids.shape)}, got "
            f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}."
        )


class TeacherLogitsCache:
    """A teacher-logits cache folder (see the module docstring), opened read-only as memory maps.

    Args:
        path: The folder written by :func:`precompute_teacher_logits`.

    Raises:
        FileNotFoundError: When the folder has no manifest.
        ValueError: When the manifest is not a teacher-logits manifest of a supported version.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        manifest_path = self.path / _MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"No teacher-logits cache at {self.path}: {_MANIFEST} is missing. Create it with "
                "`precompute_teacher_logits(teacher, token_ids, path, k=...)`."
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != _FORMAT or manifest.get("version") != _VERSION:
            raise ValueError(
                f"{manifest_path} is not a teacher-logits manifest of version {_VERSION} "
                f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})."
            )
        self.manifest: dict[str, Any] = manifest
        self._values: np.ndarray | None = None
        self._indices: np.ndarray | None = None

    # ------------------------------------------------------------------ description
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(num_sequences, seq_len, k)``."""
        m = self.manifest
        return int(m["num_sequences"]), int(m["seq_len"]), int(m["k"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def temperature(self) -> float:
        """The temperature the teacher's log-probabilities were computed at (the loss must use the same)."""
        return float(self.manifest["temperature"])

    @property
    def completed(self) -> int:
        """Number of sequences already written."""
        return int(self.manifest["completed"])

    @property
    def complete(self) -> bool:
        return self.completed == self.shape[0]

    def _key(self) -> _Key:
        m = self.manifest
        return _Key(m["data_hash"], m["teacher_hash"], int(m["k"]), float(m["temperature"]), m["value_dtype"])

    # ------------------------------------------------------------------ checks
    def verify(
        self,
        token_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        teacher: nn.Module | str | None = None,
        *,
        require_complete: bool = True,
    ) -> None:
        """Refuse a cache that belongs to other data or another teacher, or is incomplete.

        Args:
            token_ids: The token ids the cache is used with (their hash must match); ``None`` skips the check.
            attention_mask: Their attention mask, when one was given at precomputation.
            teacher: The teacher (or its :func:`teacher_fingerprint`) the cache should come from; ``None`` skips it.
            require_complete: Also refuse a cache whose precomputation has not finished.

        Raises:
            StaleTeacherCacheError: Naming what differs and how to fix it.
        """
        m = self.manifest
        if token_ids is not None:
            _check_token_ids(token_ids, attention_mask)
            if (
                tuple(token_ids.shape) != self.shape[:2]
                or data_fingerprint(token_ids, attention_mask) != m["data_hash"]
            ):
                raise StaleTeacherCacheError(
                    f"The teacher-logits cache {self.path} was computed for other token ids (hash "
                    f"{m['data_hash'][:12]}, shape {self.shape[:2]}) than the ones given (hash "
                    f"{data_fingerprint(token_ids, attention_mask)[:12]}, shape {tuple(token_ids.shape)}). The data "
                    "changed (other texts, tokenizer, order, length or padding): precompute the cache again into a "
                    "new folder (or pass overwrite=True to `precompute_teacher_logits`)."
                )
        if teacher is not None:
            found = teacher if isinstance(teacher, str) else teacher_fingerprint(teacher)
            if found != m["teacher_hash"]:
                raise StaleTeacherCacheError(
                    f"The teacher-logits cache {self.path} was computed by another teacher (hash "
                    f"{m['teacher_hash'][:12]}, given {found[:12]}): its weights or configuration changed. Precompute "
                    "the cache again with this teacher (or pass overwrite=True to `precompute_teacher_logits`)."
                )
        if require_complete and not self.complete:
            raise StaleTeacherCacheError(
                f"The teacher-logits cache {self.path} is incomplete ({self.completed} of {self.shape[0]} sequences): "
                "its precomputation was interrupted. Run `precompute_teacher_logits` again with the same arguments "
                "to resume it."
            )

    # ------------------------------------------------------------------ reading
    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._values is None or self._indices is None:
            self._values = np.load(self.path / _VALUES, mmap_mode="r")
            self._indices = np.load(self.path / _INDICES, mmap_mode="r")
        return self._values, self._indices

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int | slice | Tensor | np.ndarray) -> TopKLogProbs:
        """The stored ``(log_probs, indices)`` of the sequence(s) ``index``, as tensors (ids as int64)."""
        values, indices = self._open()
        if isinstance(index, Tensor):
            index = index.cpu().numpy()
        v = torch.from_numpy(np.array(values[index]))
        i = torch.from_numpy(np.array(indices[index]).astype(np.int64))
        return TopKLogProbs(v, i)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open the memory maps
        state = self.__dict__.copy()
        state["_values"] = state["_indices"] = None
        return state

    def __repr__(self) -> str:
        n, t, k = self.shape
        return (
            f"TeacherLogitsCache({str(self.path)!r}, sequences={n}, seq_len={t}, k={k}, "
            f"dtype={self.manifest['value_dtype']}, completed={self.completed})"
        )


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / (_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, folder / _MANIFEST)


def precompute_teacher_logits(
    teacher: nn.Module,
    token_ids: Tensor,
    path: str | os.PathLike[str],
    *,
    k: int = 64,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    temperature: float = 1.0,
    dtype: Literal["float16", "float32"] = "float16",
    device: torch.device | str | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> TeacherLogitsCache:
    r"""Run ``teacher`` once over ``token_ids`` and store its top-k log-probabilities per token under ``path``.

    Every position ``t`` of every sequence stores the ``k`` largest :math:`\log\operatorname{softmax}(z_t / T)`
    (sorted, largest first) and their ids; position ``t`` predicts token ``t + 1``, so a training step compares
    the student's logits ``[:, :-1]`` with the stored ``[:, :-1]`` on labels ``[:, 1:]``.

    Args:
        teacher: A causal LM (``model(input_ids=..., attention_mask=...).logits``) or any module mapping ids
            ``(B, T)`` to logits ``(B, T, V)``; run in eval mode under ``torch.no_grad()``.
        token_ids: ``(N, T)`` integer ids (sequences padded to one length).
        path: The cache folder (created if needed).
        k: Entries kept per token, ``1 <= k <= V``.
        attention_mask: Optional ``(N, T)`` mask passed to the teacher (part of the data's hash).
        batch_size: Sequences per teacher forward. A resumed run uses the batch size recorded in the manifest, so
            its batches are the same as an uninterrupted run's.
        temperature: ``T > 0`` of the stored log-probabilities (train with the same temperature).
        dtype: Storage dtype of the values: ``"float16"`` (half the disk) or ``"float32"``.
        device: Where to run the teacher; default: where its parameters are.
        resume: Continue an interrupted precomputation of the same key in ``path``.
        overwrite: Replace a cache of another key (or an interrupted one when ``resume=False``) instead of raising.
        progress: Called as ``progress(done, total)`` after each batch is stored.

    Returns:
        The complete cache, opened read-only.

    Raises:
        StaleTeacherCacheError: When ``path`` holds a cache of other data, another teacher or other settings (or an
            interrupted one with ``resume=False``), and ``overwrite`` is False.
        ValueError: On bad arguments, or a teacher whose output is not ``(B, T, V)`` logits.
    """
    _check_token_ids(token_ids, attention_mask)
    check_int(k, "k", low=1)
    check_int(batch_size, "batch_size", low=1)
    check_hyperparameter(temperature, "temperature", low=0.0, low_inclusive=False)
    check_choice("dtype", dtype, ("float16", "float32"))
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    n, seq_len = (int(s) for s in token_ids.shape)
    key = _Key(data_fingerprint(token_ids, attention_mask), teacher_fingerprint(teacher), k, float(temperature), dtype)

    start, manifest = 0, None
    if (folder / _MANIFEST).is_file():
        existing = TeacherLogitsCache(folder)
        same = existing._key() == key and existing.shape == (n, seq_len, k)
        if same and existing.complete:
            return existing
        if same and resume:
            manifest, start, batch_size = existing.manifest, existing.completed, int(existing.manifest["batch_size"])
        elif not overwrite:
            what = "an interrupted precomputation (resume=False)" if same else _key_difference(existing._key(), key)
            raise StaleTeacherCacheError(
                f"{folder} already holds a teacher-logits cache that does not match: {what}. Use another folder, "
                "delete this one, or pass overwrite=True to replace it."
            )

    if device is None:
        first = next(teacher.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    store_dtype = np.float16 if dtype == "float16" else np.float32
    was_training = teacher.training
    teacher.eval()
    try:
        if manifest is None:  # a fresh cache: size it from one forward
            vocab = _teacher_logits(teacher, token_ids[:1], attention_mask, device).shape[-1]
            if k > vocab:
                raise ValueError(f"`k` must be at most the teacher's vocabulary size {vocab}, got {k}.")
            np.lib.format.open_memmap(folder / _VALUES, mode="w+", dtype=store_dtype, shape=(n, seq_len, k)).flush()
            np.lib.format.open_memmap(folder / _INDICES, mode="w+", dtype=np.int32, shape=(n, seq_len, k)).flush()
            manifest = {
                "format": _FORMAT,
                "version": _VERSION,
                "num_sequences": n,
                "seq_len": seq_len,
                "k": k,
                "vocab_size": int(vocab),
                "value_dtype": dtype,
                "temperature": float(temperature),
                "batch_size": batch_size,
                "data_hash": key.data_hash,
                "teacher_hash": key.teacher_hash,
                "completed": 0,
            }
            _write_manifest(folder, manifest)
        values = np.load(folder / _VALUES, mmap_mode="r+")
        indices = np.load(folder / _INDICES, mmap_mode="r+")
        for lo in range(start, n, batch_size):
            hi = min(lo + batch_size, n)
            logits = _teacher_logits(teacher, token_ids[lo:hi], attention_mask, device, lo=lo)
            top = topk_teacher_log_probs(logits, k, temperature=temperature)
            lp = top.log_probs.clamp(min=float(np.finfo(store_dtype).min)).cpu().numpy()
            values[lo:hi] = lp.astype(store_dtype)
            indices[lo:hi] = top.indices.cpu().numpy().astype(np.int32)
            values.flush()
            indices.flush()
            manifest["completed"] = hi
            _write_manifest(folder, manifest)
            if progress is not None:
                progress(hi, n)
        del values, indices
    finally:
        teacher.train(was_training)
    return TeacherLogitsCache(folder)


def _key_difference(found: _Key, wanted: _Key) -> str:
    names = {
        "data_hash": "other token ids",
        "teacher_hash": "another teacher",
        "k": "another k",
        "temperature": "another temperature",
        "value_dtype": "another dtype",
    }
    diffs = [
        f"{label} ({getattr(found, field)!s:.12} there, {getattr(wanted, field)!s:.12} here)"
        for field, label in names.items()
        if getattr(found, field) != getattr(wanted, field)
    ]
    return "it was computed for " + ", ".join(diffs) if diffs else "its sizes differ"


def _teacher_logits(
    teacher: nn.Module, ids: Tensor, attention_mask: Tensor | None, device: torch.device | str, lo: int = 0
) -> Tensor:
    ids = ids.to(device)
    kwargs: dict[str, Tensor] = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask[lo : lo + ids.shape[0]].to(device)
    with torch.no_grad():
        try:
            out = teacher(input_ids=ids, **kwargs)
        except TypeError:  # a plain module taking the ids positionally
            out = teacher(ids, **kwargs)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise ValueError(
            f"The teacher must return logits of shape (B, T, V) for ids of shape {tuple(ids.shape)}, got "
            f"{getattr(logits, 'shape', type(logits).__name__)}."
        )
    return logits


class TeacherLogitsDataset(Dataset[dict[str, Tensor]]):
    """Training sequences with their stored teacher log-probabilities; the teacher is never loaded.

    Item ``i`` is a dict: ``input_ids`` ``(T,)``, ``attention_mask`` ``(T,)``, ``labels`` ``(T,)`` (the ids, with
    ``ignore_index`` where the mask is 0, unless ``labels`` is given), ``teacher_log_probs`` ``(T, k)`` (the stored
    dtype) and ``teacher_indices`` ``(T, k)`` (int64), and ``index``. The default collate stacks them into a batch.

    Args:
        cache: A :class:`TeacherLogitsCache` or its folder.
        token_ids: The ``(N, T)`` ids the cache was computed for (checked against its hash).
        attention_mask: The mask given at precomputation, if any.
        labels: Optional ``(N, T)`` labels (``ignore_index`` on prompt tokens, for instance).
        teacher: Optionally, the teacher (or its fingerprint) the cache must come from.
        ignore_index: Label written where the attention mask is 0.

    Raises:
        StaleTeacherCacheError: When the cache belongs to other data or another teacher, or is incomplete.
    """

    def __init__(
        self,
        cache: TeacherLogitsCache | str | os.PathLike[str],
        token_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        teacher: nn.Module | str | None = None,
        ignore_index: int = -100,
    ) -> None:
        self.cache = cache if isinstance(cache, TeacherLogitsCache) else TeacherLogitsCache(cache)
        self.cache.verify(token_ids, attention_mask, teacher)
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != token_ids.shape):
            raise ValueError(f"`labels` must have the token ids' shape {tuple(token_ids.shape)}.")
        self.token_ids = token_ids.long()
        self.attention_mask = torch.ones_like(self.token_ids) if attention_mask is None else attention_mask.long()
        if labels is None:
            labels = self.token_ids.masked_fill(self.attention_mask == 0, ignore_index)
        self.labels = labels.long()

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        top = self.cache[int(i)]
        return {
            "input_ids": self.token_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
            "teacher_log_probs": top.log_probs,
            "teacher_indices": top.indices,
            "index": torch.tensor(int(i)),
        }

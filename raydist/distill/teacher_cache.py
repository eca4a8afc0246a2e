"""The offline teacher cache: the teacher's top-k next-token log-probabilities per training token (or, with
``kd.cache_entries: sampled``, the tokens of k draws from its distribution and their empirical probabilities;
with ``top_k_tail``, its top k - d exactly and d draws from the rest; with ``last_hidden``, its last hidden state per
token, from which the workers recompute its exact logits with its output layer, saved beside the shards).

Layout of a cache directory (written to a temporary sibling and renamed into place, so a half-written
cache is never read):

  cache.json           the key (teacher, data, tokenizer, k, temperature, precision), row/shard/token counts and
                       bytes per token (the payload, and on disk)
  part-*.parquet       rows in training order: input_ids, labels (as tokenized), topk_logprobs [T * k] (row-major
                       [T, k], float16 by default, ``kd.cache_precision``), topk_indices [T * k] (uint16 when the
                       vocabulary fits, else int32), rest_mass [T] (float32: the leftover mass is often tiny);
                       a ``last_hidden`` cache has teacher_hidden [T * H] (row-major [T, H], ``kd.cache_precision``)
                       instead of the three top-k columns
  head.safetensors     ``last_hidden`` caches only: the teacher's output layer (``weight`` [V, H], ``bias`` [V] if any),
                       in its checkpoint's dtype

With k = 64, float16 log-probabilities and 2-byte ids a token costs 260 bytes of payload (516 with float32 and
int32), in DistillKit's range (~300 bytes per token).

Entry ``t`` of a row is the teacher's distribution computed from ``logits[:, t]`` (it predicts token
``t + 1``), the alignment ``kd_losses.topk_kd_loss`` expects.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from raydist.config.distill import DRAWN_ENTRIES
from raydist.distill.losses import teacher_samples, teacher_topk

if TYPE_CHECKING:
    from raydist.config import ModelConfig

CACHE_MANIFEST = "cache.json"
HEAD_FILE = "head.safetensors"  # a hidden-state cache's copy of the teacher's output layer
CACHE_FORMAT = 3  # 3: the top-k columns flat per row
PRECISIONS = {"float16": np.float16, "float32": np.float32}  # of the stored log-probabilities


class CacheMismatchError(ValueError):
    """An existing cache was built for another teacher / data / tokenizer / k / temperature."""


def tokenizer_hash(tokenizer) -> str:
    """Identifies a vocabulary: token → id pairs and the special tokens."""
    blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False) + str(tokenizer.all_special_tokens)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(
    *,
    teacher_hash: str,
    data_fingerprint: str,
    tokenizer_hash: str,
    top_k: int,
    temperature: float,
    precision: str = "float16",
    entries: str = "top_k",
    seed: int = 0,
    tail_draws: int = 0,
) -> dict[str, Any]:
    key = {
        "format": CACHE_FORMAT,
        "teacher": teacher_hash,
        "data": data_fingerprint,
        "tokenizer": tokenizer_hash,
        "top_k": top_k,
        "temperature": float(temperature),
        "precision": precision,
    }
    # A top-k cache's key is as before (caches built earlier stay valid); a sampled one also names its draws.
    if entries == "top_k":
        return key
    if entries == "last_hidden":  # hidden states do not depend on k or T: one cache serves every temperature
        return {k: v for k, v in key.items() if k not in ("top_k", "temperature")} | {"entries": entries}
    drawn = {"entries": entries, "seed": seed}
    return {**key, **drawn} if entries == "sampled" else {**key, **drawn, "tail_draws": tail_draws}


def index_dtype(vocab_size: int) -> type:
    """The narrowest integer type that holds every token id of the vocabulary."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def payload_bytes_per_token(top_k: int, precision: str, vocab_size: int, hidden_size: Optional[int] = None) -> int:
    """Bytes a cached token costs before Parquet's compression: k log-probabilities, k ids, the leftover mass;
    or, given ``hidden_size`` (a ``last_hidden`` cache), the hidden state's H values."""
    if hidden_size is not None:
        return hidden_size * np.dtype(PRECISIONS[precision]).itemsize
    return top_k * (np.dtype(PRECISIONS[precision]).itemsize + np.dtype(index_dtype(vocab_size)).itemsize) + 4


def cache_table(batch: dict[str, Any], top_k: int, precision: str, vocab_size: int):
    """One Parquet shard's table from a batch of cache rows (``input_ids``, ``labels``, ``topk_logprobs`` [T, k],
    ``topk_indices`` [T, k], ``rest_mass`` [T] per row; or ``teacher_hidden`` [T, H] instead of the three),
    built from flat numpy arrays and row offsets (no Python loop over tokens)."""
    import pyarrow as pa

    lengths = [len(x) for x in batch["input_ids"]]
    ends = np.concatenate([[0], np.cumsum(lengths)])
    offsets = pa.array(ends.astype(np.int32))

    def flat(col: str, dtype) -> np.ndarray:
        parts = []
        for x in batch[col]:
            a = np.asarray(x)
            parts.append((np.stack(list(a)) if a.dtype == object else a).astype(dtype, copy=False).reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    def listed(values):
        return pa.ListArray.from_arrays(offsets, values)

    tokens = {
        "input_ids": listed(pa.array(flat("input_ids", np.int32))),
        "labels": listed(pa.array(flat("labels", np.int32))),
    }
    # The [T, k] (or [T, H]) columns are stored flat per row (T * k values): a reader gets one contiguous array per
    # row (a reshape away from [T, k]) instead of T small arrays, which nested lists become in numpy.
    if "teacher_hidden" in batch:
        values = flat("teacher_hidden", PRECISIONS[precision])
        width = values.size // max(int(ends[-1]), 1)
        h_offsets = pa.array((ends * width).astype(np.int32))
        return pa.table({**tokens, "teacher_hidden": pa.ListArray.from_arrays(h_offsets, pa.array(values))})
    k_offsets = pa.array((ends * top_k).astype(np.int32))
    topk = lambda col, dtype: pa.ListArray.from_arrays(k_offsets, pa.array(flat(col, dtype)))  # noqa: E731
    return pa.table(
        {
            **tokens,
            "topk_logprobs": topk("topk_logprobs", PRECISIONS[precision]),
            "topk_indices": topk("topk_indices", index_dtype(vocab_size)),
            "rest_mass": listed(pa.array(flat("rest_mass", np.float32))),
        }
    )


def check_cache(cache_dir: Path, key: dict[str, Any]) -> bool:
    """True when ``cache_dir`` holds a complete cache for ``key``; False when there is none.

    Raises:
        CacheMismatchError: a cache is there but for something else; the message names what differs.
    """
    manifest = cache_dir / CACHE_MANIFEST
    if not manifest.is_file():
        if cache_dir.exists() and any(cache_dir.iterdir()):
            raise CacheMismatchError(f"{cache_dir} exists but holds no {CACHE_MANIFEST}; it is not a teacher cache")
        return False
    found = json.loads(manifest.read_text())["key"]
    differ = [k for k in {**found, **key} if found.get(k) != key.get(k)]  # both ways: a sampled cache has more
    if differ:
        raise CacheMismatchError(
            f"teacher cache {cache_dir} was built for a different {', '.join(differ)}; point kd.cache_dir at a "
            f"new directory (or delete this one) to rebuild it"
        )
    return True


def row_generator(row: np.ndarray, seed: int) -> torch.Generator:
    """The RNG of one row's sampled cache entries: seeded by the row's tokens and ``seed``, so the draws do not
    depend on how rows are batched or which actor builds them."""
    digest = hashlib.sha256(np.asarray(row, dtype=np.int64).tobytes() + str(seed).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _right_padded(model, input_ids: list[np.ndarray], pad_id: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """``(lengths, input_ids [B, T], attention_mask [B, T])`` of variable-length rows, right-padded, on the
    model's device."""
    device = next(model.parameters()).device
    lengths = [len(x) for x in input_ids]
    ids = torch.full((len(input_ids), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(input_ids):
        ids[i, : len(x)] = torch.as_tensor(np.asarray(x), dtype=torch.long)
        mask[i, : len(x)] = 1
    return lengths, ids.to(device), mask.to(device)


@torch.no_grad()
def hidden_rows(model, input_ids: list[np.ndarray], pad_id: int) -> dict[str, list]:
    """A ``last_hidden`` cache's column for a batch of token rows: the teacher's last hidden state (what its output
    layer turns into logits, as the online teacher's ``logits_at_targets`` computes them), ``teacher_hidden``
    [T, H] float32 per row, trimmed to the row's length."""
    lengths, ids, mask = _right_padded(model, input_ids, pad_id)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    return {"teacher_hidden": [hidden[i, :n].float().cpu().numpy() for i, n in enumerate(lengths)]}


def head_tensors(teacher: "ModelConfig") -> dict[str, torch.Tensor]:
    """The teacher's output layer (``weight`` [V, H], and ``bias`` [V] when it has one) for a hidden cache.

    From a Hugging Face directory of safetensors only those tensors are read, in the checkpoint's dtype, so the
    driver never holds the teacher (a 7B one would take 28 GB in float32); other sources (tiny, GGUF, ``.bin``
    checkpoints, names the checkpoint does not have) load the model once, in float32."""
    from raydist.core.models import load_model, resolve_model_source

    src = resolve_model_source(teacher)
    found = _head_from_safetensors(Path(src.path)) if src.kind == "hf_dir" else None
    if found is not None:
        return found
    head = load_model(teacher).get_output_embeddings()
    tensors = {"weight": head.weight.detach().float().contiguous()}
    if getattr(head, "bias", None) is not None:
        tensors["bias"] = head.bias.detach().float().contiguous()
    return tensors


def _head_from_safetensors(model_dir: Path) -> Optional[dict[str, torch.Tensor]]:
    """The output layer's tensors read from ``model_dir``'s safetensors (one file or an index), or None.

    The layer's parameter names come from the model built on the meta device (no memory); a tied head has two
    (``lm_head.weight`` and the input embedding's), and the checkpoint keeps one of them."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        where = {k: model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    elif (model_dir / "model.safetensors").is_file():
        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            where = {k: model_dir / "model.safetensors" for k in f.keys()}
    else:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    head = model.get_output_embeddings()
    params = [("weight", head.weight)] + ([("bias", head.bias)] if getattr(head, "bias", None) is not None else [])
    tensors = {}
    for field, param in params:
        names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is param and n in where]
        if not names:
            return None
        with safe_open(str(where[names[0]]), "pt") as f:
            tensors[field] = f.get_tensor(names[0]).contiguous()
    return tensors


def save_head(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a hidden cache's copy of the teacher's output layer (:func:`head_tensors`)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def load_head(path: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Linear:
    """The teacher's output layer of a hidden cache, frozen, as a ``Linear`` on ``device`` in ``dtype``."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    weight = tensors["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in tensors, device="meta")
    head.load_state_dict(tensors, assign=True)
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def topk_rows(
    model,
    input_ids: list[np.ndarray],
    k: int,
    temperature: float,
    pad_id: int,
    *,
    entries: str = "top_k",
    seed: int = 0,
    tail_draws: int = 0,
) -> dict[str, list]:
    """Cache columns for a batch of token rows (variable lengths; right-padded internally): the teacher's
    top k per position, or (``entries="sampled"``) k draws from it, or (``"top_k_tail"``) its top
    ``k - tail_draws`` and ``tail_draws`` draws from the rest, as :func:`~raydist.distill.losses.
    teacher_samples` keeps them.

    Returns lists (one entry per row, trimmed to the row's length): ``topk_logprobs`` [T, k] float32,
    ``topk_indices`` [T, k] int32, ``rest_mass`` [T] float32.
    """
    lengths, ids, mask = _right_padded(model, input_ids, pad_id)
    logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
    if entries in DRAWN_ENTRIES:
        exact = k - tail_draws if entries == "top_k_tail" else 0
        rows = [
            teacher_samples(
                logits[i, :n].cpu(), k, temperature, generator=row_generator(input_ids[i], seed), exact=exact
            )
            for i, n in enumerate(lengths)
        ]
    elif entries == "top_k":
        logp, idx, rest = teacher_topk(logits, k, temperature)
        rows = [(logp[i, :n], idx[i, :n], rest[i, :n]) for i, n in enumerate(lengths)]
    else:
        raise ValueError(f"cache entries must be 'top_k', 'sampled' or 'top_k_tail', got {entries!r}")
    return {
        "topk_logprobs": [r[0].float().cpu().numpy() for r in rows],
        "topk_indices": [r[1].int().cpu().numpy() for r in rows],
        "rest_mass": [r[2].float().cpu().numpy() for r in rows],
    }

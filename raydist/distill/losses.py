"""Knowledge-distillation losses for causal LMs: logit KD (full or top-k cached teacher) and hidden states.

Pure torch; no Ray here, so the distillation worker loop can also run under ``torchrun``.

Conventions every caller must know:

* **Causal shift.** As in transformers, the logits at position ``t`` predict ``labels[t + 1]``. The logit
  losses therefore compare ``logits[:, :-1]`` at the positions where ``labels[:, 1:] != -100``; the last
  position and positions whose *next* label is ``-100`` (prompt, padding) contribute nothing.
* **Sum + count, not a mean.** :func:`kd_loss` and :func:`topk_kd_loss` return ``(loss_sum, n_tokens)``.
  Average as ``sum(loss_sum) / sum(n_tokens)`` over every micro-batch of an optimizer step and every rank,
  so each target token weighs the same however the padding falls. Under DeepSpeed (which divides by
  ``gradient_accumulation_steps`` and averages gradients over data-parallel ranks) that is
  ``engine.backward(loss_sum * grad_accum * world_size / global_tokens)``, with ``global_tokens`` the
  all-reduced token count of the whole optimizer step (count it from the labels before the micro-batches).
  Dividing by the local ``n_tokens`` instead is simpler and only slightly biased.
* **Temperature.** Both distributions are ``softmax(z / T)`` and the divergence is multiplied by ``T**2``
  (Hinton et al. 2015), so gradient magnitudes stay comparable across temperatures.
* **Generalized JSD(β)**, TRL's ``generalized_jsd_loss`` convention (GKD, Agarwal et al. 2024):
  ``M = β·P_teacher + (1-β)·P_student`` and ``JSD_β = β·KL(P_teacher‖M) + (1-β)·KL(P_student‖M)``.
  ``JSD_β / β → KL(P_teacher‖P_student)`` as β → 0 and ``JSD_β / (1-β) → KL(P_student‖P_teacher)`` as
  β → 1; like TRL, the endpoints are computed exactly as the unscaled KLs: ``β == 0`` is forward KL
  (teacher‖student), ``β == 1`` is reverse KL (student‖teacher). Note the jump in scale this causes next
  to the endpoints (``JSD_β`` itself goes to 0 there). ``0 ≤ JSD_β ≤ H(β)`` (the binary entropy, ≤ log 2).
* **Gradients** reach the student only: teacher logits, cached log-probabilities and hidden states are
  detached.

Memory: a [B, T, V] logit tensor with V = 49152 is large, so the valid positions are selected first
(boolean mask → [N, V]) and all float32 work happens on those rows only.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
KDKind = Literal["forward_kl", "reverse_kl", "jsd"]
HiddenKind = Literal["mse", "cosine"]
_KD_KINDS = ("forward_kl", "reverse_kl", "jsd")

# Added to the leftover-mass bucket of the top-k losses so that log(0) never occurs: with k == V both
# leftovers are ~0, both become ~REST_FLOOR and the bucket contributes ~0 (exactly 0 in float64) to every
# divergence; elsewhere it shifts a leftover of mass r by 1e-8, far below float32 resolution of r ≫ 1e-8.
# Added (not clamped) so the student's leftover mass keeps its gradient.
REST_FLOOR = 1e-8


# --------------------------------------------------------------------------------------------- helpers


def _check_kd_args(kind: str, temperature: float, beta: float) -> None:
    if kind not in _KD_KINDS:
        raise ValueError(f"kind must be one of {_KD_KINDS}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def _shifted_mask(labels: torch.Tensor, batch_time: torch.Size) -> torch.Tensor:
    """Boolean [B, T-1]: True where position t (of the logits) has a target ``labels[t + 1]``."""
    if labels.dim() != 2 or labels.shape != batch_time:
        raise ValueError(f"labels must be [B, T] = {list(batch_time)}, got {list(labels.shape)}")
    return labels[:, 1:] != IGNORE_INDEX  # [B, T-1]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits would lose the small log-probability differences KD needs)."""
    return x if x.dtype == torch.float64 else x.float()


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``_upcast(logits) / temperature``, without the division (a pass over [N, V], and one more in the
    backward) at temperature 1."""
    z = _upcast(logits)
    return z if temperature == 1 else z / temperature


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row from log-probabilities [N, V] → [N]. Rows need not be exactly normalised."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _divergence(s_logp: torch.Tensor, t_logp: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-row divergence between student and teacher log-probabilities [N, V] → [N] (see module doc)."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(t_logp, s_logp)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(s_logp, t_logp)
    # log M = log(β·P_t + (1-β)·P_s) in log space; logaddexp needs one [N, V] temporary where
    # logsumexp(stack(...)) would need a [2, N, V] one.
    log_m = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log1p(-beta))  # [N, V]
    return beta * _kl(t_logp, log_m) + (1.0 - beta) * _kl(s_logp, log_m)


# Written here (not Liger-Kernel's fused losses): those are Triton kernels for CUDA; this is plain torch on any device.
class _RowChunkedSum(torch.autograd.Function):
    """``Σ_chunks fn(student_rows, *other_rows)`` over row chunks, each chunk differentiated in the forward.

    A softmax divergence over [N, V] rows streams float32 [N, V] intermediates (log-softmaxes, probabilities,
    their products, and the copies autograd keeps of each) through memory several times. A few rows at a time
    they stay in cache, and only the gradient [N, V] is kept for the backward: the same loss and gradient
    (every loss here is a sum of independent per-row terms), less time on CPU, and less memory anywhere.
    """

    @staticmethod
    def forward(ctx, fn, chunk_rows: int, student: torch.Tensor, *rows: torch.Tensor):
        grad = torch.empty_like(student)
        total = None
        for i in range(0, student.shape[0], chunk_rows):
            sl = slice(i, i + chunk_rows)
            with torch.enable_grad():
                s = student[sl].detach().requires_grad_(True)
                part = fn(s, *(r[sl] for r in rows))
                (grad[sl],) = torch.autograd.grad(part, s)
            total = part.detach() if total is None else total + part.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (None, None, grad * grad_out.to(grad.dtype)) + (None,) * (len(ctx.needs_input_grad) - 3)


def _row_chunk(vocab: int, device: torch.device) -> int:
    """Rows per chunk: ~4 MiB of float32 per [rows, V] temporary on CPU (the size of a core's L2 cache);
    ~256 MiB on an accelerator, where a chunk must be large to keep the device busy."""
    budget = (4 << 20) if device.type == "cpu" else (256 << 20)
    return max(1, budget // (4 * max(vocab, 1)))


def _summed_by_rows(fn, student_logits: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
    """``fn(student_logits, *rows)`` (a sum of per-row terms), computed by :class:`_RowChunkedSum` when a
    gradient is wanted and there are several chunks' worth of rows."""
    chunk = _row_chunk(student_logits.shape[-1], student_logits.device)
    if not (torch.is_grad_enabled() and student_logits.requires_grad) or student_logits.shape[0] <= chunk:
        return fn(student_logits, *rows)
    return _RowChunkedSum.apply(fn, chunk, student_logits, *rows)


# ---------------------------------------------------------------------------------------- logit KD


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: KDKind = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level distillation loss between full student and teacher next-token distributions.

    ``forward_kl`` = KL(P_teacher‖P_student) (mass-covering, classic KD); ``reverse_kl`` =
    KL(P_student‖P_teacher) (mode-seeking); ``jsd`` = generalized JSD(β) in TRL's convention
    (``M = β·P_teacher + (1-β)·P_student``; β == 0 → forward KL, β == 1 → reverse KL, see module doc).

    When the vocabularies differ (same-family models padded to different sizes), both sides are truncated
    to the common ``min(V_student, V_teacher)`` entries and renormalised there; checking that the two
    tokenizers agree is the caller's job.

    Args:
        student_logits: [B, T, V_s], any float dtype (bf16 is fine; the math runs in float32, or float64
            for float64 inputs).
        teacher_logits: [B, T, V_t]; detached here. Both sides must be finite within the common vocabulary
            (a -inf logit gives 0·inf = NaN; mask with a large negative number instead).
        labels: [B, T] int, ``-100`` where there is no target. Position t's logits are scored iff
            ``labels[:, t + 1] != -100`` (the transformers causal shift).
        kind: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        temperature: T > 0; both sides use softmax(z / T) and the result is multiplied by T².
        beta: JSD interpolation weight in [0, 1] (weight of the teacher in the mixture); ignored otherwise.

    Returns:
        ``(loss_sum, n_tokens)``: float32 (float64 for float64 inputs) scalar summed over the scored tokens
        (differentiable w.r.t. the student; 0 with a graph when nothing is scored), and an int64 scalar
        count of those tokens.

    Raises:
        ValueError: unknown kind, temperature ≤ 0, beta outside [0, 1], or mismatched shapes.
    """
    _check_kd_args(kind, temperature, beta)
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise ValueError("student_logits and teacher_logits must be [B, T, V]")
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"student and teacher logits disagree on [B, T]: {list(student_logits.shape[:2])} vs "
            f"{list(teacher_logits.shape[:2])}"
        )
    mask = _shifted_mask(labels, student_logits.shape[:2])  # [B, T-1]
    # Slicing is a view; the boolean index is the first copy and holds only the N scored rows.
    s = student_logits[:, :-1][mask]  # [N, V_s]
    t = teacher_logits[:, :-1][mask]  # [N, V_t]
    return kd_loss_on_rows(s, t, kind=kind, temperature=temperature, beta=beta), mask.sum()


def kd_loss_on_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: KDKind = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """:func:`kd_loss` on rows already selected: the logits of the N scored positions only.

    The distillation stage computes the LM head only at target positions (prompt and padding positions
    never reach the vocabulary projection), which saves most of the head's cost on instruction data; it
    then calls this directly.

    Args:
        student_logits: [N, V_s]; teacher_logits: [N, V_t] (detached here), row i of both at the same token.
        kind, temperature, beta: as in :func:`kd_loss`.

    Returns:
        The loss summed over the N rows (float32, or float64 for float64 inputs), × T².
    """
    _check_kd_args(kind, temperature, beta)
    if student_logits.dim() != 2 or student_logits.shape[0] != teacher_logits.shape[0] or teacher_logits.dim() != 2:
        raise ValueError(
            f"row logits must be [N, V] with the same N, got {list(student_logits.shape)} and "
            f"{list(teacher_logits.shape)}"
        )
    vocab = min(student_logits.size(-1), teacher_logits.size(-1))

    def rows_sum(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s_logp = torch.log_softmax(_tempered(s[:, :vocab], temperature), dim=-1)  # [n, V] float32
        t_logp = torch.log_softmax(_tempered(t.detach()[:, :vocab], temperature), dim=-1)  # [n, V]
        return _divergence(s_logp, t_logp, kind, beta).sum() * temperature**2

    return _summed_by_rows(rows_sum, student_logits, teacher_logits)


# ------------------------------------------------------------------------------------ top-k cache KD


@torch.no_grad()
def teacher_topk(
    teacher_logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    *,
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A top-k cache entry of the teacher's next-token distributions, for :func:`topk_kd_loss`.

    Alignment is the same as the logits': entry ``[:, t]`` is the teacher distribution computed from
    ``teacher_logits[:, t]``, i.e. the prediction of token ``t + 1``. Keep every position (the loss applies
    the shift and the label mask itself).

    Args:
        teacher_logits: [B, T, V_t].
        k: entries kept per position, 1 ≤ k ≤ V.
        temperature: the distribution stored is softmax(z / T); use the same T in :func:`topk_kd_loss`.
        vocab_size: truncate the vocabulary to its first ``vocab_size`` entries before normalising. Pass
            the student's vocab size when the teacher's is padded larger, to match :func:`kd_loss`'s
            ``min(V)`` truncation.

    Returns:
        ``(logprobs, indices, rest_mass)``: float32 [B, T, k] log-probabilities sorted descending, int64
        [B, T, k] vocabulary ids, and float32 [B, T] probability outside the top k (exactly 0 at k == V).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = teacher_logits[..., :vocab_size] if vocab_size is not None else teacher_logits
    if not 1 <= k <= logits.size(-1):
        raise ValueError(f"k must be in [1, {logits.size(-1)}], got {k}")
    logp = torch.log_softmax(_tempered(logits, temperature), dim=-1)  # [B, T, V]
    values, indices = logp.topk(k, dim=-1, sorted=True)  # [B, T, k] each
    # Leftover mass summed over the complement rather than 1 - sum(top-k): no cancellation when it is
    # tiny (peaked teachers) and exactly 0 when k == V. In place: logp is not needed any more.
    rest_mass = logp.scatter_(-1, indices, float("-inf")).logsumexp(-1).exp()  # [B, T]
    return values, indices, rest_mass


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_rest_mass: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: KDKind = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kd_loss` against a teacher known only by its cached top-k log-probabilities.

    The missing mass is handled explicitly: each position becomes a (k+1)-bucket distribution, for the
    teacher ``(p_t[i_1], …, p_t[i_k], rest_t)`` and for the student ``(p_s[i_1], …, p_s[i_k],
    1 - Σ_j p_s[i_j])`` at the *teacher's* indices, and the same divergence as :func:`kd_loss` (same kind,
    β convention and T² factor) is computed on those buckets. Merging tokens into one bucket can only
    lower a divergence, so this is a lower bound of the full loss that tightens as k grows and equals it
    at k == V (both leftovers are 0). Each leftover gets ``REST_FLOOR`` (1e-8) added so log(0) never
    occurs. How fast it tightens depends on the kind: forward KL and JSD are dominated by the teacher's
    mass, so covering the teacher's peak is enough (k at the number of dominant tokens is already close);
    reverse KL weighs the student's tail against the teacher's, which the cache lumps together, and stays
    well below the full value until k approaches V (tests/unit/distill pins both behaviours).
    Prefer forward KL or JSD with β < 1 on a top-k cache. ``temperature`` applies to the student only: the cache
    already holds the teacher at T (it must be the T given to :func:`teacher_topk`).

    Args:
        student_logits: [B, T, V_s], any float dtype.
        teacher_topk_logprobs: [B, T, k] teacher log-probabilities at ``temperature`` (any order); detached.
        teacher_topk_indices: [B, T, k] integer vocabulary ids of those entries.
        teacher_rest_mass: [B, T] teacher probability outside the top k (not a log).
        labels: [B, T], ``-100`` where there is no target; same causal shift as :func:`kd_loss` — the
            cache entry at position t (teacher logits[:, t]) is scored iff ``labels[:, t + 1] != -100``.
        kind: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        temperature: T > 0; student softmax(z / T), result × T².
        beta: JSD weight of the teacher in the mixture, in [0, 1].
        vocab_size: vocabulary the cache was normalised over when it is smaller than the student's; the
            student's logits are truncated to it, as :func:`kd_loss` truncates to ``min(V)``.

    Returns:
        ``(loss_sum, n_tokens)`` as in :func:`kd_loss`.

    Raises:
        ValueError: bad kind/temperature/beta, mismatched shapes, or a scored cache index outside the
            student's (truncated) vocabulary. That last check reads one scalar back from the device.
    """
    _check_kd_args(kind, temperature, beta)
    bt = student_logits.shape[:2]
    if student_logits.dim() != 3:
        raise ValueError("student_logits must be [B, T, V]")
    if teacher_topk_logprobs.shape != teacher_topk_indices.shape or teacher_topk_logprobs.shape[:2] != bt:
        raise ValueError(
            f"teacher top-k log-probs {list(teacher_topk_logprobs.shape)} and indices "
            f"{list(teacher_topk_indices.shape)} must both be [B, T, k] with [B, T] = {list(bt)}"
        )
    if teacher_rest_mass.shape != bt:
        raise ValueError(f"teacher_rest_mass must be [B, T] = {list(bt)}, got {list(teacher_rest_mass.shape)}")
    mask = _shifted_mask(labels, bt)  # [B, T-1]
    loss = topk_kd_loss_on_rows(
        student_logits[:, :-1][mask],
        teacher_topk_logprobs[:, :-1][mask],
        teacher_topk_indices[:, :-1][mask],
        teacher_rest_mass[:, :-1][mask],
        kind=kind,
        temperature=temperature,
        beta=beta,
        vocab_size=vocab_size,
    )
    return loss, mask.sum()


def _student_vocab(student_logits: torch.Tensor, vocab_size: Optional[int]) -> int:
    """The student's vocabulary the cache losses normalise over: its logits' width truncated to ``vocab_size``."""
    return student_logits.size(-1) if vocab_size is None else min(vocab_size, student_logits.size(-1))


def _check_cache_ids(indices: torch.Tensor, vocab: int, what: str, hint: str = "") -> None:
    """Raises ValueError (naming ``what``, then ``hint``) for a cache token id outside ``[0, vocab)``. Called
    once per loss, before the rows are split into chunks: the check reads one scalar back from the device."""
    if indices.numel() and (int(indices.max()) >= vocab or int(indices.min()) < 0):
        raise ValueError(f"{what} fall outside the student's vocabulary [0, {vocab}){hint}")


def _student_logprobs_at(
    student_logits: torch.Tensor, indices: torch.Tensor, temperature: float, vocab: int
) -> torch.Tensor:
    """The student's tempered log-probabilities [N, k] at a cache's token ids [N, k] (checked by
    :func:`_check_cache_ids`), over its first ``vocab`` logits. Only the normaliser and k gathered entries are
    needed, not a full [N, V] log_softmax."""
    z = _tempered(student_logits[:, :vocab], temperature)  # [N, V]
    return z.gather(-1, indices.long()) - z.logsumexp(-1, keepdim=True)


def topk_kd_loss_on_rows(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_rest_mass: torch.Tensor,
    *,
    kind: KDKind = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """:func:`topk_kd_loss` on rows already selected (the N scored positions; see :func:`kd_loss_on_rows`).

    Args:
        student_logits: [N, V_s]; teacher_topk_logprobs / teacher_topk_indices: [N, k];
            teacher_rest_mass: [N]; the rest as in :func:`topk_kd_loss`.

    Returns:
        The loss summed over the N rows, × T².
    """
    _check_kd_args(kind, temperature, beta)
    n = student_logits.shape[0]
    if (
        student_logits.dim() != 2
        or teacher_topk_logprobs.shape != teacher_topk_indices.shape
        or teacher_topk_logprobs.dim() != 2
        or teacher_topk_logprobs.shape[0] != n
        or teacher_rest_mass.shape != (n,)
    ):
        raise ValueError(
            f"rows must be student [N, V], top-k log-probs and indices [N, k], rest mass [N]; got "
            f"{list(student_logits.shape)}, {list(teacher_topk_logprobs.shape)}, "
            f"{list(teacher_topk_indices.shape)}, {list(teacher_rest_mass.shape)}"
        )
    vocab = _student_vocab(student_logits, vocab_size)
    _check_cache_ids(
        teacher_topk_indices,
        vocab,
        "teacher top-k indices",
        "; build the cache with teacher_topk(..., vocab_size=<student vocab>)",
    )

    def rows_sum(s: torch.Tensor, logprobs: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        s_k = _student_logprobs_at(s, indices, temperature, vocab)  # [n, k]
        t_k = _upcast(logprobs.detach())  # [n, k]
        t_rest = _upcast(rest.detach())  # [n]
        s_rest = (1.0 - s_k.exp().sum(-1)).clamp_min(0.0)  # [n]; clamp: rounding can push it below 0
        s_buckets = torch.cat([s_k, (s_rest + REST_FLOOR).log().unsqueeze(-1)], dim=-1)  # [n, k+1]
        t_buckets = torch.cat([t_k, (t_rest.clamp_min(0.0) + REST_FLOOR).log().unsqueeze(-1)], dim=-1)  # [n, k+1]
        return _divergence(s_buckets, t_buckets, kind, beta).sum() * temperature**2

    return _summed_by_rows(rows_sum, student_logits, teacher_topk_logprobs, teacher_topk_indices, teacher_rest_mass)


@torch.no_grad()
def teacher_samples(
    teacher_logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    *,
    vocab_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    exact: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sampled cache entry (random-sampling KD, Anshumann et al. 2025): ``k`` tokens drawn with replacement
    from the teacher's next-token distribution at every position, kept as the distinct tokens drawn and their
    empirical probabilities (count / k), for :func:`sampled_kd_loss_on_rows`. Unlike the top k, the empirical
    distribution is an unbiased estimate of the teacher's, so the forward-KL gradient it gives the student
    (``p_s - q̂``) is unbiased too; the top-k bucket loss systematically ignores how the teacher spreads its
    tail.

    With ``exact = e > 0`` the teacher's top e tokens are kept with their exact probabilities and the other
    ``k - e`` slots are draws from the rest of the distribution (renormalised), each weighing
    ``rest_mass · count / (k - e)``: still unbiased, and the noise is confined to the tail, whose mass is small.

    Args:
        teacher_logits: [B, T, V_t]; k: slots per position; temperature: draws from softmax(z / T);
        vocab_size: as in :func:`teacher_topk`; generator: the draws' RNG (None: torch's global one);
        exact: how many of the k slots hold the exact top tokens (0 <= exact < k).

    Returns:
        ``(logprobs, indices, rest_mass)`` shaped as :func:`teacher_topk`'s: [B, T, k] log probabilities
        sorted descending, -inf in the slots past the distinct tokens (whose index repeats the first one);
        [B, T, k] ids; [B, T] zeros (the entries carry all the mass).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = teacher_logits[..., :vocab_size] if vocab_size is not None else teacher_logits
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0 <= exact < k:
        raise ValueError(f"exact must be in [0, k) = [0, {k}), got {exact}")
    bt, v = logits.shape[:-1], logits.size(-1)
    probs = torch.softmax(_tempered(logits, temperature).float(), dim=-1).reshape(-1, v)  # [N, V]
    m = k - exact  # draws
    if exact:
        top_p, top_i = probs.topk(exact, dim=-1)
        rest = probs.scatter(-1, top_i, 0.0)
        mass = rest.sum(-1, keepdim=True)  # [N, 1]
        # A row whose tail has no mass draws anything: its draws weigh mass · count / m = 0 (padding below).
        draw_from = torch.where(mass > 0, rest, torch.ones_like(rest))
    else:
        draw_from, mass = probs, probs.new_ones(probs.size(0), 1)
    draws = torch.multinomial(draw_from, m, replacement=True, generator=generator).sort(-1).values  # [N, m]
    # Run-length counts of the sorted draws: a run starts where the id changes; its count sits at its start.
    start = torch.ones_like(draws, dtype=torch.bool)
    start[:, 1:] = draws[:, 1:] != draws[:, :-1]
    run = start.long().cumsum(-1) - 1  # [N, m] run number of every slot
    counts = torch.zeros_like(draws).scatter_add_(-1, run, torch.ones_like(draws))  # [N, m] per run number
    firsts = torch.zeros_like(draws).scatter_(-1, run, draws)  # [N, m] the id of each run
    n_runs = start.sum(-1, keepdim=True)  # [N, 1]
    used = torch.arange(m, device=draws.device).expand_as(draws) < n_runs
    w = torch.where(used, counts.float() / m * mass, torch.zeros_like(mass))
    logp, ids = w.log(), firsts  # log 0 = -inf marks padding
    if exact:
        logp, ids = torch.cat([top_p.log(), logp], -1), torch.cat([top_i, ids], -1)
    logp, order = logp.sort(-1, descending=True)
    ids = ids.gather(-1, order)
    ids = torch.where(logp > float("-inf"), ids, ids[:, :1])  # padding slots point at a kept token
    return logp.reshape(*bt, k), ids.reshape(*bt, k), logp.new_zeros(bt)


def sampled_kd_loss_on_rows(
    student_logits: torch.Tensor,
    sampled_logprobs: torch.Tensor,
    sampled_indices: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Forward KL from the empirical teacher distribution of a sampled cache (:func:`teacher_samples`) to the
    student, on the N selected rows: ``Σ_j q̂_j (log q̂_j - log p_s[i_j])``, × T². Its gradient in the student's
    logits is ``p_s - q̂`` per row, whose expectation over the draws is the full forward-KL gradient
    ``p_s - p_t``. Slots with log-probability -inf (padding) weigh nothing.

    Args:
        student_logits: [N, V_s]; sampled_logprobs / sampled_indices: [N, k]; temperature: T > 0 (the
            student's; the cache was drawn at the same T); vocab_size: as in :func:`topk_kd_loss_on_rows`.

    Returns:
        The loss summed over the N rows, × T².
    """
    _check_kd_args("forward_kl", temperature, 0.5)
    if student_logits.dim() != 2 or sampled_logprobs.shape != sampled_indices.shape or sampled_logprobs.dim() != 2:
        raise ValueError(
            f"rows must be student [N, V] and sampled log-probs / indices [N, k]; got {list(student_logits.shape)}, "
            f"{list(sampled_logprobs.shape)}, {list(sampled_indices.shape)}"
        )
    vocab = _student_vocab(student_logits, vocab_size)
    _check_cache_ids(sampled_indices, vocab, "sampled indices")

    def rows_sum(s: torch.Tensor, logprobs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        s_logp = _student_logprobs_at(s, indices, temperature, vocab)
        w = _upcast(logprobs.detach()).exp()  # [n, k]; 0 in the padding slots
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)  # stored at float16: renormalise
        return (torch.xlogy(w, w).sum(-1) - (w * s_logp).sum(-1)).sum() * temperature**2

    return _summed_by_rows(rows_sum, student_logits, sampled_logprobs, sampled_indices)


# -------------------------------------------------------------------------------- hidden-state KD


def default_layer_mapping(n_student_layers: int, n_teacher_layers: int) -> list[tuple[int, int]]:
    """Evenly spaced (student, teacher) pairs of ``hidden_states`` indices; the last layer maps to the last.

    Indices follow ``output_hidden_states=True`` (0 = embeddings, i = output of layer i). Student layer
    ``i`` (1..n_s) maps to teacher layer ``round(i · n_t / n_s)`` — e.g. 4 → 12 layers gives
    ``[(1, 3), (2, 6), (3, 9), (4, 12)]`` (TinyBERT's uniform strategy). The embeddings are left out;
    add ``(0, 0)`` yourself when the widths and tokenizers match.

    Args:
        n_student_layers: number of transformer layers of the student (≥ 1).
        n_teacher_layers: number of transformer layers of the teacher (≥ 1).

    Returns:
        ``n_student_layers`` pairs ``(student_index, teacher_index)``.
    """
    if n_student_layers < 1 or n_teacher_layers < 1:
        raise ValueError(f"layer counts must be ≥ 1, got {n_student_layers} and {n_teacher_layers}")
    # Integer round-half-up of i * n_t / n_s: exact, no float surprises.
    return [
        (i, (2 * i * n_teacher_layers + n_student_layers) // (2 * n_student_layers))
        for i in range(1, n_student_layers + 1)
    ]


class HiddenProjection(nn.Module):
    """Learned linear maps from the student's hidden width to the teacher's, one per mapped layer pair.

    One map per pair by default because each depth of the residual stream has its own feature basis (and a
    width-pruned student keeps different channels per layer); ``shared=True`` uses a single map for all
    pairs (fewer parameters). No bias: it would only absorb mean offsets the student should learn itself.
    When the widths are equal the maps start as the identity, so the loss starts at its unprojected value.

    The module's parameters must be trained with the student: give them to the optimizer / DeepSpeed
    engine (e.g. hold student and projection in one container module) and leave them out of the exported
    artifact.

    Args:
        student_dim: student hidden size H_s.
        teacher_dim: teacher hidden size H_t.
        n_pairs: number of (student, teacher) layer pairs the loss uses.
        shared: one map for all pairs instead of one per pair.
    """

    def __init__(self, student_dim: int, teacher_dim: int, n_pairs: int, *, shared: bool = False):
        super().__init__()
        if n_pairs < 1:
            raise ValueError(f"n_pairs must be ≥ 1, got {n_pairs}")
        self.student_dim, self.teacher_dim, self.n_pairs, self.shared = student_dim, teacher_dim, n_pairs, shared
        self.maps = nn.ModuleList(
            nn.Linear(student_dim, teacher_dim, bias=False) for _ in range(1 if shared else n_pairs)
        )
        if student_dim == teacher_dim:
            with torch.no_grad():
                for m in self.maps:
                    m.weight.copy_(torch.eye(student_dim))

    def forward(self, hidden: torch.Tensor, pair: int) -> torch.Tensor:
        """Project ``hidden`` [..., H_s] of mapped pair number ``pair`` to [..., H_t] (weight dtype)."""
        layer = self.maps[0 if self.shared else pair]
        return layer(hidden.to(layer.weight.dtype))


def hidden_state_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    mapping: Sequence[tuple[int, int]],
    projection: Optional[HiddenProjection] = None,
    attention_mask: Optional[torch.Tensor] = None,
    kind: HiddenKind = "mse",
) -> torch.Tensor:
    """Intermediate-representation loss between mapped student and teacher layers.

    Per token and pair: ``mse`` = mean over the teacher's hidden dim of (proj(h_s) - h_t)²; ``cosine`` =
    1 - cos(proj(h_s), h_t). The result is the mean over valid tokens and pairs. Computed in float32;
    teacher states are detached. Note that transformers' last ``hidden_states`` entry is usually taken
    after the final norm while the others are raw residual-stream states.

    Args:
        student_hidden: ``hidden_states`` of the student (``output_hidden_states=True``): [B, T, H_s] each,
            index 0 = embeddings.
        teacher_hidden: the teacher's, [B, T, H_t] each.
        mapping: ``(student_index, teacher_index)`` pairs, e.g. :func:`default_layer_mapping`.
        projection: :class:`HiddenProjection` with ``n_pairs == len(mapping)``; required when H_s != H_t,
            optional otherwise. Pair ``p`` of ``mapping`` uses its map ``p``.
        attention_mask: [B, T], 1 = real token, 0 = padding (excluded); None scores every token.
        kind: ``"mse"`` or ``"cosine"``.

    Returns:
        float32 (float64 for float64 inputs) scalar; 0 (with a graph) when no token is valid.

    Raises:
        ValueError: unknown kind, empty mapping, a projection of the wrong size, differing widths without a
            projection, or mismatched [B, T].
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
    if not mapping:
        raise ValueError("mapping is empty")
    if projection is not None and not projection.shared and projection.n_pairs != len(mapping):
        raise ValueError(f"projection has {projection.n_pairs} maps but mapping has {len(mapping)} pairs")
    mask = attention_mask.bool() if attention_mask is not None else None
    total = None
    for p, (si, ti) in enumerate(mapping):
        hs, ht = student_hidden[si], teacher_hidden[ti].detach()  # [B, T, H_s], [B, T, H_t]
        if hs.shape[:2] != ht.shape[:2] or (mask is not None and mask.shape != hs.shape[:2]):
            raise ValueError(
                f"pair {p} ({si}, {ti}): student {list(hs.shape)}, teacher {list(ht.shape)} and mask "
                f"{None if mask is None else list(mask.shape)} must share [B, T]"
            )
        # Select the valid tokens before projecting: padding costs neither compute nor memory.
        hs = hs[mask] if mask is not None else hs.reshape(-1, hs.size(-1))  # [N, H_s]
        ht = ht[mask] if mask is not None else ht.reshape(-1, ht.size(-1))  # [N, H_t]
        if projection is not None:
            hs = projection(hs, p)  # [N, H_t]
        elif hs.size(-1) != ht.size(-1):
            raise ValueError(f"pair {p}: widths differ ({hs.size(-1)} vs {ht.size(-1)}); pass a HiddenProjection")
        hs, ht = _upcast(hs), _upcast(ht)
        if kind == "mse":
            per_token = (hs - ht).pow(2).mean(-1)  # [N]
        else:
            per_token = 1.0 - F.cosine_similarity(hs, ht, dim=-1)  # [N]
        total = per_token.sum() if total is None else total + per_token.sum()
    n_tokens = mask.sum() if mask is not None else student_hidden[mapping[0][0]].shape[:2].numel()
    # clamp: an all-padding batch gives 0 (keeping the graph for ZeRO's collective backward), not NaN.
    return total / (len(mapping) * torch.as_tensor(n_tokens, device=total.device).clamp_min(1))

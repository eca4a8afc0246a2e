"""KD losses against naive reference formulas (explicit loops over positions and vocabulary, float64)."""

import math

import pytest
import torch

from raydist.distill.losses import (
    HiddenProjection,
    default_layer_mapping,
    hidden_state_loss,
    kd_loss,
    kd_loss_on_rows,
    sampled_kd_loss_on_rows,
    teacher_samples,
    teacher_topk,
    topk_kd_loss,
    topk_kd_loss_on_rows,
)

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]


def _logits(*shape, seed, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _labels(b=2, t=6, v=7, seed=0):
    """Random targets with a masked prompt (first 2 of row 0) and right padding (last 2 of row 1)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100
    labels[1, -2:] = -100
    return labels


def _softmax(row, temp):
    m = max(row)
    e = [math.exp((x - m) / temp) for x in row]
    z = sum(e)
    return [x / z for x in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _naive_divergence(p_t, p_s, kind, beta):
    if kind == "forward_kl":
        return _kl(p_t, p_s)
    if kind == "reverse_kl":
        return _kl(p_s, p_t)
    if beta == 0:
        return _kl(p_t, p_s)
    if beta == 1:
        return _kl(p_s, p_t)
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)


def naive_kd(student, teacher, labels, kind, temp=1.0, beta=0.5, t_squared=True):
    """Sum over (b, t) with labels[b, t+1] != -100 of T² · D(softmax(t/T), softmax(s/T)), and the count."""
    total, count = 0.0, 0
    v = min(student.shape[-1], teacher.shape[-1])
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            p_s = _softmax(student[b, t, :v].tolist(), temp)
            p_t = _softmax(teacher[b, t, :v].tolist(), temp)
            total += (temp**2 if t_squared else 1.0) * _naive_divergence(p_t, p_s, kind, beta)
            count += 1
    return total, count


# ------------------------------------------------------------------------------------------ kd_loss


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_kd_loss_matches_naive_formula(kind, beta, temp):
    s, t, labels = _logits(2, 6, 7, seed=1), _logits(2, 6, 7, seed=2), _labels()
    loss, n = kd_loss(s, t, labels, kind=kind, temperature=temp, beta=beta)
    ref, ref_n = naive_kd(s, t, labels, kind, temp, beta)
    assert int(n) == ref_n == 7  # 10 shifted positions, 1 prompt target and 2 padding targets masked
    assert loss.dtype == torch.float64 and float(loss) == pytest.approx(ref, rel=1e-9)  # float64 stays float64


def test_temperature_scales_by_t_squared():
    s, t, labels = _logits(2, 6, 7, seed=3), _logits(2, 6, 7, seed=4), _labels()
    loss_t2, _ = kd_loss(s, t, labels, temperature=2.0)
    unscaled, _ = naive_kd(s, t, labels, "forward_kl", temp=2.0, t_squared=False)
    assert float(loss_t2) == pytest.approx(4.0 * unscaled, rel=1e-5)
    # And T actually reaches the softmax: softening changes the divergence itself, not just the factor.
    loss_t1, _ = kd_loss(s, t, labels, temperature=1.0)
    assert abs(float(loss_t2) / 4.0 - float(loss_t1)) > 1e-3


def test_masked_positions_change_nothing():
    s, t, labels = _logits(2, 6, 7, seed=5), _logits(2, 6, 7, seed=6), _labels()
    base = kd_loss(s, t, labels, kind="jsd")
    s2, t2, labels2 = s.clone(), t.clone(), labels.clone()
    # Row 0: positions 0 (predicts the masked label 1) and the last position (predicts nothing).
    # Row 1: positions 3, 4, 5 predict the padding labels 4, 5 or nothing. labels[:, 0] is never a target.
    for b, pos in [(0, 0), (0, 5), (1, 3), (1, 4), (1, 5)]:
        s2[b, pos] = torch.randn(7, dtype=torch.float64) * 10
        t2[b, pos] = torch.randn(7, dtype=torch.float64) * 10
    labels2[:, 0] = torch.tensor([3, -100])
    got = kd_loss(s2, t2, labels2, kind="jsd")
    assert float(got[0]) == pytest.approx(float(base[0]), rel=1e-6) and int(got[1]) == int(base[1])
    # Whereas changing a scored position does change the loss.
    s2[0, 1] += torch.arange(7, dtype=torch.float64)
    assert float(kd_loss(s2, t2, labels2, kind="jsd")[0]) != pytest.approx(float(base[0]), rel=1e-6)


def test_token_count_is_unmasked_shifted_labels():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [1, 2, 3, -100, -100]])
    _, n = kd_loss(torch.zeros(2, 5, 9), torch.zeros(2, 5, 9), labels)
    assert n.dtype == torch.int64 and int(n) == 2 + 2


def test_zero_when_equal_positive_otherwise():
    s, t, labels = _logits(2, 6, 7, seed=7), _logits(2, 6, 7, seed=8), _labels()
    for kind, beta in KINDS:
        same, _ = kd_loss(s, s.clone(), labels, kind=kind, beta=beta, temperature=1.5)
        diff, _ = kd_loss(s, t, labels, kind=kind, beta=beta, temperature=1.5)
        assert abs(float(same)) < 1e-6 and float(diff) > 1e-2, kind


def test_jsd_endpoints_are_the_kls():
    s, t, labels = _logits(2, 6, 7, seed=9), _logits(2, 6, 7, seed=10), _labels()
    fwd, rev = kd_loss(s, t, labels, kind="forward_kl")[0], kd_loss(s, t, labels, kind="reverse_kl")[0]
    assert float(fwd) != pytest.approx(float(rev), rel=1e-2)  # the two endpoints really differ
    assert float(kd_loss(s, t, labels, kind="jsd", beta=0.0)[0]) == pytest.approx(float(fwd), rel=1e-6)
    assert float(kd_loss(s, t, labels, kind="jsd", beta=1.0)[0]) == pytest.approx(float(rev), rel=1e-6)


def test_jsd_scaled_limits_approach_the_kls():
    """TRL/GKD's sense of the limits: JSD_β/β → KL(teacher‖student), JSD_β/(1-β) → KL(student‖teacher)."""
    s, t, labels = _logits(2, 6, 7, seed=11), _logits(2, 6, 7, seed=12), _labels()
    fwd, rev = float(kd_loss(s, t, labels, kind="forward_kl")[0]), float(kd_loss(s, t, labels, kind="reverse_kl")[0])
    eps = 1e-4
    assert float(kd_loss(s, t, labels, kind="jsd", beta=eps)[0]) / eps == pytest.approx(fwd, rel=5e-3)
    assert float(kd_loss(s, t, labels, kind="jsd", beta=1 - eps)[0]) / eps == pytest.approx(rev, rel=5e-3)


def test_jsd_symmetry_and_bound():
    s, t, labels = _logits(2, 6, 7, seed=13), _logits(2, 6, 7, seed=14), _labels()
    # M and the weights are symmetric at β = 0.5; in general swapping sides maps β to 1 - β.
    assert float(kd_loss(s, t, labels, kind="jsd", beta=0.5)[0]) == pytest.approx(
        float(kd_loss(t, s, labels, kind="jsd", beta=0.5)[0]), rel=1e-6
    )
    assert float(kd_loss(s, t, labels, kind="jsd", beta=0.3)[0]) == pytest.approx(
        float(kd_loss(t, s, labels, kind="jsd", beta=0.7)[0]), rel=1e-6
    )
    assert float(kd_loss(s, t, labels, kind="jsd", beta=0.3)[0]) != pytest.approx(
        float(kd_loss(t, s, labels, kind="jsd", beta=0.3)[0]), rel=1e-3
    )
    # 0 ≤ JSD_β ≤ T²·H(β) per token, reached for (almost) disjoint supports.
    temp, beta = 2.0, 0.3
    h = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
    loss, n = kd_loss(s, t, labels, kind="jsd", beta=beta, temperature=temp)
    assert 0 < float(loss) / int(n) < temp**2 * h
    hot_s = torch.full((2, 6, 7), -1e4, dtype=torch.float64)
    hot_t = hot_s.clone()
    hot_s[..., 0], hot_t[..., 1] = 0.0, 0.0
    loss, n = kd_loss(hot_s, hot_t, labels, kind="jsd", beta=beta, temperature=temp)
    assert float(loss) / int(n) == pytest.approx(temp**2 * h, rel=1e-4)


def test_gradient_reaches_the_student_only():
    s = _logits(2, 6, 7, seed=15, dtype=torch.float32).requires_grad_()
    t = _logits(2, 6, 7, seed=16, dtype=torch.float32).requires_grad_()
    labels = _labels()
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        s.grad = None
        loss, _ = kd_loss(s, t, labels, kind=kind)
        loss.backward()
        assert t.grad is None
        scored = torch.zeros(2, 6, dtype=torch.bool)
        scored[:, :-1] = labels[:, 1:] != -100
        assert (s.grad[scored].abs().sum(-1) > 0).all()  # every scored position gets a gradient
        assert (s.grad[~scored] == 0).all()  # and masked ones none


def test_bf16_inputs_computed_in_float32():
    s, t, labels = (
        _logits(2, 6, 7, seed=17, dtype=torch.bfloat16),
        _logits(2, 6, 7, seed=18, dtype=torch.bfloat16),
        _labels(),
    )
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        loss, _ = kd_loss(s, t, labels, kind=kind)
        ref, _ = kd_loss(s.float(), t.float(), labels, kind=kind)
        assert loss.dtype == torch.float32 and float(loss) == pytest.approx(float(ref), rel=1e-6)


def test_vocab_truncated_to_common_size():
    s, t, labels = _logits(2, 6, 9, seed=19), _logits(2, 6, 7, seed=20), _labels()
    for kind, beta in KINDS:
        loss, _ = kd_loss(s, t, labels, kind=kind, beta=beta)
        assert float(loss) == pytest.approx(float(kd_loss(s[..., :7], t, labels, kind=kind, beta=beta)[0]), rel=1e-6)
        assert float(loss) == pytest.approx(naive_kd(s, t, labels, kind, beta=beta)[0], rel=1e-5)
        swapped, _ = kd_loss(t, s, labels, kind=kind, beta=beta)  # student smaller than teacher
        assert float(swapped) == pytest.approx(float(kd_loss(t, s[..., :7], labels, kind=kind, beta=beta)[0]), rel=1e-6)


def test_nothing_scored_gives_zero_with_a_graph():
    s = torch.randn(2, 4, 5, requires_grad=True)
    loss, n = kd_loss(s, torch.randn(2, 4, 5), torch.full((2, 4), -100), kind="jsd")
    loss.backward()  # every rank must be able to run backward, even on an all-prompt micro-batch
    assert float(loss.detach()) == 0.0 and int(n) == 0 and (s.grad == 0).all()


def test_bad_arguments_raise():
    s, labels = torch.randn(2, 4, 5), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="kind"):
        kd_loss(s, s, labels, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        kd_loss(s, s, labels, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, labels, temperature=0.0)
    with pytest.raises(ValueError, match="B, T"):
        kd_loss(s, torch.randn(2, 3, 5), labels)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(s, s, labels[:, :3])


# ------------------------------------------------------------------------------------- top-k cache


def test_teacher_topk_cache_entry():
    t = _logits(2, 6, 7, seed=21)
    logp, idx, rest = teacher_topk(t, 3, temperature=2.0)
    assert logp.shape == idx.shape == (2, 6, 3) and rest.shape == (2, 6) and idx.dtype == torch.int64
    full = torch.log_softmax(t / 2.0, dim=-1)
    # Same alignment as the logits: entry [:, t] comes from teacher_logits[:, t].
    assert torch.allclose(logp, full.topk(3, dim=-1).values) and torch.equal(idx, full.topk(3, dim=-1).indices)
    assert (logp[..., :-1] >= logp[..., 1:]).all()
    assert (
        torch.allclose(logp.exp().sum(-1) + rest, torch.ones(2, 6, dtype=torch.float64), atol=1e-12)
        and (rest > 0).all()
    )
    assert (teacher_topk(t, 7)[2] == 0).all()  # nothing is left outside at k == V
    assert teacher_topk(_logits(2, 6, 9, seed=22), 7, vocab_size=7)[1].max() < 7


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_topk_equals_full_loss_at_k_equal_vocab(kind, beta, temp):
    s, t, labels = _logits(2, 6, 7, seed=23), _logits(2, 6, 7, seed=24), _labels()
    full, n = kd_loss(s, t, labels, kind=kind, temperature=temp, beta=beta)
    cache = teacher_topk(t, 7, temperature=temp)
    got, n_k = topk_kd_loss(s, *cache, labels, kind=kind, temperature=temp, beta=beta)
    assert int(n_k) == int(n) and float(got) == pytest.approx(float(full), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_topk_approaches_full_loss_as_k_grows_on_peaked_teacher(kind, beta):
    v = 64
    s, labels = _logits(2, 6, v, seed=25, scale=1.0), _labels(v=v)
    t = _logits(2, 6, v, seed=26, scale=1.0)
    t[..., :4] += 8.0  # a peaked teacher: nearly all its mass on 4 tokens
    full, _ = kd_loss(s, t, labels, kind=kind, beta=beta)
    gaps = []
    for k in (1, 4, 16, 64):  # gaps[1]: the teacher's peak is covered
        got, _ = topk_kd_loss(s, *teacher_topk(t, k), labels, kind=kind, beta=beta)
        gaps.append(float(full) - float(got))
    # Bucketing both sides by the same partition can only lose divergence (data-processing inequality),
    # so the gap is ≥ 0 and shrinks as buckets are split; it is small once the teacher's peak is covered.
    assert all(g >= -1e-6 for g in gaps) and gaps == sorted(gaps, reverse=True)
    assert gaps[0] > 0.3 * float(full) and abs(gaps[-1]) < 1e-6 * float(full)
    if kind == "reverse_kl":  # needs the student's tail against the teacher's, which the cache lacks
        assert gaps[2] < 0.15 * float(full)
    else:  # covering the teacher's peak is enough
        assert gaps[1] < 0.01 * float(full)


def test_topk_masking_gradient_and_truncation():
    s = _logits(2, 6, 9, seed=27, dtype=torch.float32).requires_grad_()
    t, labels = _logits(2, 6, 7, seed=28), _labels()
    logp, idx, rest = teacher_topk(t, 3)
    loss, n = topk_kd_loss(s, logp, idx, rest, labels, kind="reverse_kl", vocab_size=7)
    loss.backward()
    # The student's truncated padding columns get nothing; every scored row reaches all 7 real columns
    # (the leftover bucket and the normaliser carry the gradient to tokens outside the top-k).
    scored = torch.zeros(2, 6, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100
    assert (s.grad[..., 7:] == 0).all() and (s.grad[~scored] == 0).all()
    assert (s.grad[scored][:, :7] != 0).all() and int(n) == 7
    # Garbage in the cache at unscored positions changes nothing.
    logp2, idx2, rest2 = logp.clone(), idx.clone(), rest.clone()
    logp2[1, 4:], idx2[1, 4:], rest2[0, 0] = -0.1, 0, 0.9
    again, _ = topk_kd_loss(s, logp2, idx2, rest2, labels, kind="reverse_kl", vocab_size=7)
    assert float(again.detach()) == pytest.approx(float(loss.detach()))
    # An index the student cannot represent is an error, not a silent wrong gather.
    with pytest.raises(ValueError, match="vocabulary"):
        topk_kd_loss(s[..., :5], logp, idx, rest, labels)


def test_topk_full_cache_with_truncated_teacher_matches_kd_loss():
    s, t, labels = _logits(2, 6, 7, seed=29), _logits(2, 6, 9, seed=30), _labels()  # teacher padded larger
    full, _ = kd_loss(s, t, labels, kind="jsd", beta=0.4)
    got, _ = topk_kd_loss(s, *teacher_topk(t, 7, vocab_size=7), labels, kind="jsd", beta=0.4)
    assert float(got) == pytest.approx(float(full), rel=1e-5)


# ---------------------------------------------------------------------------------- hidden states


def _val(x):
    return float(x.detach())


def _hidden(n_layers, b, t, h, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, h, generator=g, dtype=torch.float64) for _ in range(n_layers + 1)]


def test_default_layer_mapping():
    assert default_layer_mapping(4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert default_layer_mapping(3, 3) == [(1, 1), (2, 2), (3, 3)]
    for n_s, n_t in [(3, 8), (5, 30), (7, 9), (1, 4), (6, 4)]:
        m = default_layer_mapping(n_s, n_t)
        assert len(m) == n_s and m[-1] == (n_s, n_t)
        assert [si for si, _ in m] == list(range(1, n_s + 1))
        teacher = [ti for _, ti in m]
        assert teacher == sorted(teacher) and all(abs(ti - si * n_t / n_s) <= 0.5 for si, ti in m)
    with pytest.raises(ValueError):
        default_layer_mapping(0, 4)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_zero_for_identical_states(kind):
    hs = _hidden(3, 2, 5, 4, seed=31)
    mapping = [(i, i) for i in range(4)]
    assert _val(hidden_state_loss(hs, [h.clone() for h in hs], mapping, kind=kind)) == pytest.approx(0.0, abs=1e-7)
    # Equal widths: the projection starts as the identity.
    proj = HiddenProjection(4, 4, n_pairs=4)
    assert _val(hidden_state_loss(hs, hs, mapping, proj, kind=kind)) == pytest.approx(0.0, abs=1e-6)
    assert _val(hidden_state_loss(hs, _hidden(3, 2, 5, 4, seed=32), mapping, kind=kind)) > 0.1


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_with_projection_matches_naive_and_masks_padding(kind):
    s_h, t_h = _hidden(2, 2, 5, 3, seed=33), _hidden(4, 2, 5, 6, seed=34)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mapping = [(1, 2), (2, 4)]
    proj = HiddenProjection(3, 6, n_pairs=2).double()
    loss = hidden_state_loss(s_h, t_h, mapping, proj, mask, kind=kind)
    terms = []
    for p, (si, ti) in enumerate(mapping):
        w = proj.maps[p].weight.detach()
        for b in range(2):
            for t in range(5):
                if mask[b, t]:
                    a, c = w @ s_h[si][b, t], t_h[ti][b, t]
                    terms.append(
                        float(((a - c) ** 2).mean()) if kind == "mse" else 1 - float(a @ c / (a.norm() * c.norm()))
                    )
    assert _val(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # Padding is ignored: garbage there changes nothing.
    s2 = [h.clone() for h in s_h]
    s2[1][0, 3:] = 100.0
    assert _val(hidden_state_loss(s2, t_h, mapping, proj, mask, kind=kind)) == pytest.approx(_val(loss), rel=1e-6)
    # A projection that maps the student exactly onto the teacher gives 0; the loss trains the projection.
    t_exact = [h.clone() for h in t_h]
    for p, (si, ti) in enumerate(mapping):
        t_exact[ti] = (s_h[si] @ proj.maps[p].weight.detach().T).requires_grad_()
    assert _val(hidden_state_loss(s_h, t_exact, mapping, proj, mask, kind=kind)) == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in proj.maps)
    assert all(t_exact[ti].grad is None for _, ti in mapping)


def test_hidden_projection_shared_and_errors():
    assert len(HiddenProjection(3, 6, n_pairs=4, shared=True).maps) == 1
    assert len(HiddenProjection(3, 6, n_pairs=4).maps) == 4
    s_h, t_h = _hidden(2, 1, 3, 3, seed=35), _hidden(2, 1, 3, 6, seed=36)
    with pytest.raises(ValueError, match="widths differ"):
        hidden_state_loss(s_h, t_h, [(1, 1)])
    with pytest.raises(ValueError, match="maps"):
        hidden_state_loss(s_h, t_h, [(1, 1)], HiddenProjection(3, 6, n_pairs=2).double())
    with pytest.raises(ValueError, match="kind"):
        hidden_state_loss(s_h, s_h, [(1, 1)], kind="l1")
    # bf16 states through a float32 projection work, and all padding gives 0 rather than NaN.
    proj = HiddenProjection(3, 6, n_pairs=1)
    out = hidden_state_loss([h.bfloat16() for h in s_h], [h.bfloat16() for h in t_h], [(1, 1)], proj)
    assert out.dtype == torch.float32 and torch.isfinite(out) and _val(out) > 0
    zero = hidden_state_loss(s_h, t_h, [(1, 1)], proj.double(), torch.zeros(1, 3))
    assert _val(zero) == 0.0


def test_teacher_samples_are_an_empirical_distribution_of_the_draws():
    t = _logits(2, 5, 30, seed=40)
    logp, idx, rest = teacher_samples(t, 16, generator=torch.Generator().manual_seed(0))
    assert logp.shape == idx.shape == (2, 5, 16) and rest.shape == (2, 5) and (rest == 0).all()
    w = logp.exp()
    assert torch.allclose(w.sum(-1), torch.ones(2, 5, dtype=w.dtype)) and (logp[..., :-1] >= logp[..., 1:]).all()
    # every probability is a count over 16 draws; distinct tokens first, padding (-inf) points at a drawn one
    assert torch.allclose(w * 16, (w * 16).round(), atol=1e-5)
    used = logp > float("-inf")
    for row_ids, row_used in zip(idx.reshape(-1, 16), used.reshape(-1, 16)):
        assert len(set(row_ids[row_used].tolist())) == int(row_used.sum())
        assert set(row_ids[~row_used].tolist()) <= set(row_ids[row_used].tolist())
    again = teacher_samples(t, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], logp) and torch.equal(again[1], idx)
    assert teacher_samples(_logits(2, 5, 40, seed=41), 8, vocab_size=30)[1].max() < 30


def test_sampled_cache_gradient_is_unbiased_where_the_top_k_is_not():
    v, n = 40, 3
    s = _logits(n, v, seed=42, scale=1.0, dtype=torch.float64)
    t = _logits(1, n, v, seed=43, scale=1.0)  # a flat teacher: a third of its mass outside its top 8

    def grad(loss_of):
        x = s.clone().requires_grad_()
        loss_of(x).backward()
        return x.grad

    full = grad(lambda x: kd_loss_on_rows(x, t[0]))  # p_s - p_t per row
    draws = 400
    g = torch.Generator().manual_seed(1)
    mean = sum(
        grad(lambda x: sampled_kd_loss_on_rows(x, *teacher_samples(t[0], 8, generator=g)[:2])) for _ in range(draws)
    )
    mean = mean / draws
    topk = grad(lambda x: topk_kd_loss_on_rows(x, *(c[0] for c in teacher_topk(t, 8))))
    err_sampled = float((mean - full).abs().max())
    err_topk = float((topk - full).abs().max())
    # 400 draws of 8 tokens: the mean's error is ~ sqrt(p (1 - p) / 3200) <= 0.01; the top-k's bias is not
    # averaged away (it never tells the student how the teacher spreads its tail).
    assert err_sampled < 0.02 and err_topk > 3 * err_sampled, (err_sampled, err_topk)


def test_top_k_tail_keeps_the_exact_top_and_draws_the_rest():
    t = _logits(2, 5, 30, seed=46)
    logp, idx, rest = teacher_samples(t, 12, generator=torch.Generator().manual_seed(0), exact=4)
    assert logp.shape == idx.shape == (2, 5, 12) and (rest == 0).all() and (logp[..., :-1] >= logp[..., 1:]).all()
    probs = torch.softmax(t.float(), -1)
    top_p, top_i = probs.topk(4, -1)
    w = logp.exp()
    assert torch.allclose(w.sum(-1), torch.ones(2, 5), atol=1e-5)
    tail_mass = 1 - top_p.sum(-1)
    for r in range(2):
        for p in range(5):
            kept = {int(i): float(x) for i, x in zip(idx[r, p], w[r, p]) if x > 0}
            for i, x in zip(top_i[r, p].tolist(), top_p[r, p].tolist()):
                assert kept.pop(i) == pytest.approx(x, rel=1e-6)  # the top 4, exactly
            # the rest: distinct tokens outside the top 4, each weighing tail mass x count / 8
            counts = [x / float(tail_mass[r, p]) * 8 for x in kept.values()]
            assert sum(counts) == pytest.approx(8, abs=1e-4) and all(abs(c - round(c)) < 1e-4 for c in counts)
    with pytest.raises(ValueError, match="exact"):
        teacher_samples(t, 4, exact=4)


def test_top_k_tail_gradient_is_unbiased_with_less_noise_than_sampling():
    v, n, draws = 40, 3, 400
    s = _logits(n, v, seed=47, scale=1.0, dtype=torch.float64)
    t = _logits(1, n, v, seed=48, scale=1.0)

    def grad(cache):
        x = s.clone().requires_grad_()
        sampled_kd_loss_on_rows(x, *cache[:2]).backward()
        return x.grad

    x = s.clone().requires_grad_()
    kd_loss_on_rows(x, t[0]).backward()
    full = x.grad
    g = torch.Generator().manual_seed(2)
    sampled = torch.stack([grad(teacher_samples(t[0], 8, generator=g)) for _ in range(draws)])
    tail = torch.stack([grad(teacher_samples(t[0], 8, generator=g, exact=4)) for _ in range(draws)])
    assert float((tail.mean(0) - full).abs().max()) < 0.02  # unbiased, as the sampled cache
    # the same 8 slots per token, but the noise is only the tail's: a smaller spread around the full gradient
    spread = lambda gs: float(((gs - full) ** 2).sum((1, 2)).mean())  # noqa: E731
    assert spread(tail) < 0.7 * spread(sampled), (spread(tail), spread(sampled))


def test_sampled_loss_is_the_kl_from_the_empirical_distribution():
    s = _logits(4, 12, seed=44)
    t = _logits(1, 4, 12, seed=45)
    logp, idx, _ = teacher_samples(t, 6, generator=torch.Generator().manual_seed(3))
    got = sampled_kd_loss_on_rows(s, logp[0], idx[0], temperature=2.0)
    want = 0.0
    for r in range(4):
        s_logp = torch.log_softmax(s[r] / 2.0, -1)
        for lp, i in zip(logp[0, r].tolist(), idx[0, r].tolist()):
            if lp > float("-inf"):
                want += math.exp(lp) * (lp - float(s_logp[i]))
    assert float(got) == pytest.approx(want * 4.0, rel=1e-6)
    with pytest.raises(ValueError, match="vocabulary"):
        sampled_kd_loss_on_rows(s[:, :5], logp[0], idx[0].clamp_min(6))


# ------------------------------------------------------------------------------- row-chunked losses


def _loss_and_grad(fn, s: torch.Tensor):
    x = s.clone().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize(
    "make",
    [
        lambda t, idx, lp: lambda x: kd_loss_on_rows(x, t, kind="forward_kl", temperature=2.0),
        lambda t, idx, lp: lambda x: kd_loss_on_rows(x, t, kind="reverse_kl"),
        lambda t, idx, lp: lambda x: kd_loss_on_rows(x, t, kind="jsd", beta=0.3),
        lambda t, idx, lp: lambda x: topk_kd_loss_on_rows(x, *teacher_topk(t, 8)),
        lambda t, idx, lp: lambda x: sampled_kd_loss_on_rows(x, lp, idx),
    ],
    ids=["forward_kl", "reverse_kl", "jsd", "top_k", "sampled"],
)
def test_row_chunked_losses_equal_the_whole_batch_computation(make, monkeypatch):
    """The row losses run chunk by chunk (each chunk differentiated in the forward) when rows are many: the
    loss and the student's gradient are those of one computation over every row, and the forward keeps no
    autograd graph of the [N, V] intermediates."""
    import raydist.distill.losses as losses

    g = torch.Generator().manual_seed(0)
    n, v = 11, 300
    s, t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3, torch.randn(n, v, generator=g) * 3
    lp, idx = teacher_samples(t, 8, generator=g)[:2]
    fn = make(t, idx, lp)
    monkeypatch.setattr(losses, "_row_chunk", lambda vocab, device: 10**9)  # one chunk: plain autograd
    whole, whole_grad = _loss_and_grad(fn, s)
    calls = []
    real = losses._RowChunkedSum.forward

    def counting(ctx, f, chunk_rows, *args):
        calls.append(chunk_rows)
        return real(ctx, f, chunk_rows, *args)

    monkeypatch.setattr(losses, "_row_chunk", lambda vocab, device: 4)  # chunks of 4, 4 and 3 rows
    monkeypatch.setattr(losses._RowChunkedSum, "forward", staticmethod(counting))
    chunked, chunked_grad = _loss_and_grad(fn, s)
    assert calls == [4]
    assert torch.allclose(chunked, whole, rtol=1e-12, atol=0)
    assert torch.allclose(chunked_grad, whole_grad, rtol=1e-9, atol=1e-15)
    assert chunked_grad.abs().sum() > 0


def test_row_chunks_fit_a_cpu_cache_and_an_accelerator_batch():
    from raydist.distill.losses import _row_chunk

    assert _row_chunk(49152, torch.device("cpu")) == 21  # 4 MiB of float32 rows
    assert _row_chunk(49152, torch.device("cuda")) == 1365
    assert _row_chunk(10**9, torch.device("cpu")) == 1

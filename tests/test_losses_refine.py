"""CLIP-Refine: HyCD limits and a hand-worked case, RaFA's reference draw, input checks."""
import math

import pytest
import torch

from openclip_align.losses.refine import CLIPRefineLoss, HyCDLoss, RaFALoss


def log_softmax_row(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def matmul_t(a, b):
    return [[sum(p * q for p, q in zip(u, v)) for v in b] for u in a]


def random_raw(b=5, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(b, d, generator=gen, dtype=torch.float64),
            2 * torch.randn(b, d, generator=gen, dtype=torch.float64))


def test_hycd_alpha_one_is_symmetric_infonce_on_unscaled_logits():
    f, g = random_raw()
    tf, tg = random_raw(seed=1)
    got = HyCDLoss(alpha=1.0)(f, g, tf, tg)
    fs, gs = f.tolist(), g.tolist()
    expected = 0.0
    for logits in (matmul_t(fs, gs), matmul_t(gs, fs)):
        expected += -sum(log_softmax_row(row)[i] for i, row in enumerate(logits)) / len(fs)
    assert got.item() == pytest.approx(expected / 2, rel=1e-10)


def test_hycd_alpha_zero_with_student_equal_teacher_is_the_teacher_entropy_with_zero_gradient():
    f, g = random_raw()
    f.requires_grad_(True)
    g.requires_grad_(True)
    value = HyCDLoss(alpha=0.0)(f, g, f.detach(), g.detach())
    value.backward()
    entropy = 0.0                                          # zero KL: only H(P) of the teacher rows remains
    for logits in (matmul_t(f.tolist(), g.tolist()), matmul_t(g.tolist(), f.tolist())):
        for row in logits:
            entropy += -sum(math.exp(lp) * lp for lp in log_softmax_row(row)) / len(logits)
    assert value.item() == pytest.approx(entropy / 2, rel=1e-10)
    assert f.grad.abs().max().item() < 1e-12 and g.grad.abs().max().item() < 1e-12


def test_hycd_hand_worked_case():
    # student f = I, g = [[1, 1], [0, 1]] -> S = f g^T = [[1, 0], [1, 1]]; teacher F = G = I -> softmax rows
    # of I put s = e / (1 + e) on the diagonal. alpha = 0.5: P = [[.5 + s/2, (1-s)/2], [(1-s)/2, .5 + s/2]].
    s = math.e / (1 + math.e)
    p = [[0.5 + s / 2, (1 - s) / 2], [(1 - s) / 2, 0.5 + s / 2]]
    q_image = [[s, 1 - s], [0.5, 0.5]]          # softmax rows of [[1, 0], [1, 1]]
    q_text = [[0.5, 0.5], [1 - s, s]]           # softmax rows of S^T = [[1, 1], [0, 1]]

    def cross_entropy(p_rows, q_rows):
        return -sum(pv * math.log(qv) for pr, qr in zip(p_rows, q_rows) for pv, qv in zip(pr, qr)) / 2

    expected = (cross_entropy(p, q_image) + cross_entropy(p, q_text)) / 2
    f = torch.eye(2, dtype=torch.float64)
    g = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    got = HyCDLoss(alpha=0.5)(f, g, torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def cosines(a, b):
    unit = lambda rows: [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in rows]   # noqa: E731
    return matmul_t(unit(a), unit(b))


@pytest.mark.parametrize("scale", [1.0, 14.3])
def test_hycd_logit_scale_variant_is_soft_cross_entropy_on_scaled_cosines(scale):
    f, g = random_raw(seed=5)
    tf, tg = random_raw(seed=6)
    got = HyCDLoss(alpha=0.5, logit_scale=scale)(f, g, tf, tg)
    expected = 0.0
    for student, teacher in ((cosines(f.tolist(), g.tolist()), cosines(tf.tolist(), tg.tolist())),
                             (cosines(g.tolist(), f.tolist()), cosines(tg.tolist(), tf.tolist()))):
        for i, (s_row, t_row) in enumerate(zip(student, teacher)):
            q = log_softmax_row([scale * v for v in s_row])
            t = [math.exp(v) for v in log_softmax_row([scale * v for v in t_row])]
            p = [0.5 * (j == i) + 0.5 * t[j] for j in range(len(t))]
            expected += -sum(pj * qj for pj, qj in zip(p, q)) / len(student)
    assert got.item() == pytest.approx(expected / 2, rel=1e-10)
    # the raw norms no longer matter: rescaling every feature leaves the variant unchanged
    assert HyCDLoss(alpha=0.5, logit_scale=scale)(3 * f, 0.2 * g, 5 * tf, tg).item() == pytest.approx(expected / 2,
                                                                                                       rel=1e-10)


def test_refine_reads_the_logit_scale_flag_and_defaults_to_the_authors_raw_features():
    import argparse

    from openclip_align.integration.trainer_args import build_plugin_parser

    default = build_plugin_parser().parse_known_args(["--loss", "refine"])[0]
    assert CLIPRefineLoss.from_args(default).hycd.logit_scale is None
    scaled = build_plugin_parser().parse_known_args(["--loss", "refine", "--hycd-logit-scale", "15"])[0]
    assert CLIPRefineLoss.from_args(scaled).hycd.logit_scale == 15.0
    with pytest.raises(ValueError, match="--hycd-logit-scale must be positive"):
        CLIPRefineLoss.from_args(argparse.Namespace(hycd_logit_scale=0.0))


def test_hycd_alpha_zero_is_cross_entropy_to_the_teacher_distribution():
    f, g = random_raw(seed=3)
    tf, tg = random_raw(seed=4)
    got = HyCDLoss(alpha=0.0)(f, g, tf, tg).item()
    total = 0.0
    for student, teacher in ((matmul_t(f.tolist(), g.tolist()), matmul_t(tf.tolist(), tg.tolist())),
                             (matmul_t(g.tolist(), f.tolist()), matmul_t(tg.tolist(), tf.tolist()))):
        for s_row, t_row in zip(student, teacher):
            log_p, log_q = log_softmax_row(t_row), log_softmax_row(s_row)
            total += -sum(math.exp(lp) * lq for lp, lq in zip(log_p, log_q)) / len(student)
    assert got == pytest.approx(total / 2, rel=1e-10)


def test_rafa_hand_worked_with_a_vanishing_prior():
    # with s -> 0 the reference is ~0: RaFA = mean(f^2) + mean(g^2) = (1+4+9+16)/4 + (0+1+1+0)/4 = 8
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert RaFALoss(scale=1e-9)(f, g).item() == pytest.approx(8.0, abs=1e-6)


def reference_seen_by(loss, f):
    """Recover Z from the gradient: with g = f, d/df [mean (f - z)^2] = 2 (f - z) / (B d)."""
    f = f.clone().requires_grad_(True)
    g = f.detach().clone().requires_grad_(True)
    value = loss(f, g)
    value.backward()
    torch.testing.assert_close(f.grad, g.grad)           # one reference row per pair, shared by image and text
    z = f.detach() - f.grad * f.numel() / 2
    # and the value is the MSE to that reference, computed independently
    assert value.item() == pytest.approx(2 * ((f.detach() - z) ** 2).mean().item(), rel=1e-9)
    return z


def test_rafa_reference_is_gaussian_seeded_and_redrawn_every_step():
    f = torch.zeros(200, 16, dtype=torch.float64)
    a, b = RaFALoss(scale=2.0, seed=7), RaFALoss(scale=2.0, seed=7)
    z1, z2 = reference_seen_by(a, f), reference_seen_by(a, f)
    assert not torch.allclose(z1, z2)                    # a fresh draw every step
    torch.testing.assert_close(reference_seen_by(b, f), z1)   # same seed, same draws
    for z in (z1, z2):
        assert abs(z.mean().item()) < 0.1 and z.std().item() == pytest.approx(2.0, rel=0.05)


def test_rafa_reference_is_kept_across_gradient_accumulation_calls():
    loss = RaFALoss(scale=1.0, seed=0, accum_freq=2)
    f = torch.zeros(3, 4, dtype=torch.float64)
    z = [reference_seen_by(loss, f) for _ in range(4)]
    torch.testing.assert_close(z[0], z[1])
    torch.testing.assert_close(z[2], z[3])
    assert not torch.allclose(z[0], z[2])


def test_rafa_draw_sequence_continues_after_a_state_round_trip():
    """What --resume does: a fresh loss loaded with the saved state draws the next Z of the original run."""
    f = torch.zeros(6, 4, dtype=torch.float64)
    straight = CLIPRefineLoss(seed=3)
    rafa = straight.rafa
    for _ in range(3):
        reference_seen_by(rafa, f)
    resumed = CLIPRefineLoss(seed=3)
    resumed.load_state_dict(straight.state_dict())
    torch.testing.assert_close(reference_seen_by(resumed.rafa, f), reference_seen_by(rafa, f))
    fresh = CLIPRefineLoss(seed=3)                            # without the state: the first draw again
    assert not torch.allclose(reference_seen_by(fresh.rafa, f), reference_seen_by(rafa, f))


def test_clip_refine_combines_weighted_terms():
    f, g = random_raw(seed=5)
    tf, tg = random_raw(seed=6)
    one = CLIPRefineLoss(alpha=0.5, rafa_weight=1.0, seed=11)(f, g, None, tf, tg, output_dict=True)
    three = CLIPRefineLoss(alpha=0.5, rafa_weight=3.0, seed=11)(f, g, None, tf, tg, output_dict=True)
    assert set(one) == {"hycd_loss", "rafa_loss"}
    torch.testing.assert_close(three["rafa_loss"], 3 * one["rafa_loss"])
    torch.testing.assert_close(one["hycd_loss"], HyCDLoss(0.5)(f, g, tf, tg))
    total = CLIPRefineLoss(alpha=0.5, rafa_weight=3.0, seed=11)(
        f, g, torch.tensor(5.0), teacher_image_features=tf, teacher_text_features=tg)
    torch.testing.assert_close(total, three["hycd_loss"] + three["rafa_loss"])


def test_trainable_logit_scale_gets_a_zero_gradient():
    f, g = random_raw(seed=8)
    scale = torch.tensor(2.0, requires_grad=True)
    CLIPRefineLoss(seed=0)(f, g, scale.exp(), f, g).backward()
    assert scale.grad is not None and scale.grad.item() == 0.0


@pytest.mark.parametrize("teacher, message", [
    ((None, None), "needs teacher_image_features"),
    ((torch.zeros(5, 4), None), "needs teacher_text_features"),
    ((torch.zeros(4, 4), torch.zeros(4, 4)), "batch has 5 pairs"),
    ((torch.zeros(5, 4), torch.zeros(5, 3)), "same shape"),
])
def test_missing_or_bad_teacher_features_raise(teacher, message):
    f, g = random_raw()
    with pytest.raises(ValueError, match=message):
        CLIPRefineLoss()(f, g, 1.0, teacher[0], teacher[1])


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="hycd-alpha"):
        HyCDLoss(alpha=1.5)
    with pytest.raises(ValueError, match="rafa-scale"):
        RaFALoss(scale=0.0)

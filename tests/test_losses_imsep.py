"""IMSep (AlignCLIP): hand-worked values, the S = 0 limit, input checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from openclip_align.losses.imsep import IMSepLoss

from _reference import sp, upstream_clip_loss_class


# Two pairs worked by hand (t = 2):
#   x1 = (1, 0), x2 = (0.6, 0.8); y1 = (0.6, 0.8), y2 = (0, 1); captions e1 = (2, 0), e2 = (3, 4)
#   C = [[0.6, 0], [1.0, 0.8]]; V_12 = 0.6; U_12 = 0.8; S_12 = 0.6 -> D_12 = 0.4
#   V' = [[0.6, 0.24], [0.24, 0.8]]   U' = [[0.6, 0.32], [0.32, 0.8]]
X = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
Y = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
E = torch.tensor([[2.0, 0.0], [3.0, 4.0]])
T = 2.0
CLIP_BY_HAND = (sp(-1.2) + sp(0.4) + sp(0.8) + sp(-1.6)) / 4       # rows of 2C and of 2C^T
IMSEP_BY_HAND = (sp(0.48 - 1.2) + sp(0.48 - 1.6)) / 2           # rows [1.2, 0.48], [0.48, 1.6]
IMSEP_TEXT_BY_HAND = (sp(0.64 - 1.2) + sp(0.64 - 1.6)) / 2           # rows [1.2, 0.64], [0.64, 1.6]


def test_default_is_the_authors_objective_on_the_hand_worked_case():
    """Authors' script: CE(tC) + CE(tC^T) + 0.5 (IMSep_img + IMSep_txt); on ClipLoss's scale (halved) that is
    ClipLoss + 0.25 IMSep_img + 0.25 IMSep_txt."""
    loss = IMSepLoss()
    out = loss(X, Y, torch.tensor(T), semantic_features=E, output_dict=True)
    assert set(out) == {"contrastive_loss", "imsep_loss", "imsep_text_loss"}
    assert out["contrastive_loss"].item() == pytest.approx(CLIP_BY_HAND, abs=1e-6)
    assert out["imsep_loss"].item() == pytest.approx(0.25 * IMSEP_BY_HAND, abs=1e-6)
    assert out["imsep_text_loss"].item() == pytest.approx(0.25 * IMSEP_TEXT_BY_HAND, abs=1e-6)
    ce_rows = (sp(-1.2) + sp(0.4)) / 2                      # CE(tC): rows [1.2, 0], [2.0, 1.6]
    ce_cols = (sp(0.8) + sp(-1.6)) / 2                      # CE(tC^T): rows [1.2, 2.0], [0, 1.6]
    authors = ce_rows + ce_cols + 0.5 * (IMSEP_BY_HAND + IMSEP_TEXT_BY_HAND)
    assert loss(X, Y, T, semantic_features=E).item() == pytest.approx(authors / 2, abs=1e-6)


def test_image_only_variant_of_the_paper_text():
    out = IMSepLoss(text_term=False)(X, Y, T, semantic_features=E, output_dict=True)
    assert set(out) == {"contrastive_loss", "imsep_loss"}
    assert sum(out.values()).item() == pytest.approx(CLIP_BY_HAND + 0.25 * IMSEP_BY_HAND, abs=1e-6)


def test_hand_worked_case():
    out = IMSepLoss(weight=0.5, text_term=False)(X, Y, torch.tensor(T), semantic_features=E, output_dict=True)
    assert set(out) == {"contrastive_loss", "imsep_loss"}
    assert out["contrastive_loss"].item() == pytest.approx(CLIP_BY_HAND, abs=1e-6)
    assert out["imsep_loss"].item() == pytest.approx(0.5 * IMSEP_BY_HAND, abs=1e-6)


def test_hand_worked_text_term_and_sum():
    loss = IMSepLoss(weight=0.3, text_term=True)
    out = loss(X, Y, T, semantic_features=E, output_dict=True)
    assert out["imsep_text_loss"].item() == pytest.approx(0.3 * IMSEP_TEXT_BY_HAND, abs=1e-6)
    total = loss(X, Y, T, semantic_features=E)
    expected = CLIP_BY_HAND + 0.3 * (IMSEP_BY_HAND + IMSEP_TEXT_BY_HAND)
    assert total.item() == pytest.approx(expected, abs=1e-6)


def test_fully_dissimilar_captions_give_plain_image_image_cross_entropy():
    torch.manual_seed(0)
    b, t = 5, 3.7
    x = F.normalize(torch.randn(b, 4, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(b, 4, dtype=torch.float64), dim=-1)
    semantic = torch.eye(b, dtype=torch.float64) * torch.arange(1, b + 1)     # orthogonal: S = 0 off diagonal
    got = IMSepLoss(weight=1.0)(x, y, t, semantic_features=semantic, output_dict=True)["imsep_loss"]
    xs, ys = x.tolist(), y.tolist()
    dot = lambda u, v: sum(a * c for a, c in zip(u, v))
    expected = 0.0
    for i in range(b):
        logits = [t * (dot(xs[i], ys[i]) if j == i else dot(xs[i], xs[j])) for j in range(b)]
        expected += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    assert got.item() == pytest.approx(expected / b, rel=1e-10)


def test_contrastive_term_matches_upstream_clip_loss():
    ClipLoss = upstream_clip_loss_class()
    torch.manual_seed(1)
    x = F.normalize(torch.randn(6, 8), dim=-1)
    y = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(14.3)
    ours = IMSepLoss()(x, y, scale, semantic_features=torch.randn(6, 3), output_dict=True)["contrastive_loss"]
    torch.testing.assert_close(ours, ClipLoss()(x, y, scale))


def test_semantic_features_get_no_gradient_and_features_do():
    torch.manual_seed(2)
    x = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_()
    semantic = torch.randn(4, 5, requires_grad=True)
    out = IMSepLoss()(x, y, 10.0, semantic_features=semantic, output_dict=True)
    out["imsep_loss"].backward()
    assert semantic.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert y.grad is not None and y.grad.abs().sum() > 0      # through the positive C_ii


def test_semantic_scale_does_not_matter():
    """S is a cosine: rescaling each caption embedding leaves the loss unchanged."""
    loss = IMSepLoss()
    a = loss(X, Y, T, semantic_features=E)
    b = loss(X, Y, T, semantic_features=E * torch.tensor([[0.1], [25.0]]))
    torch.testing.assert_close(a, b)


def test_logit_bias_and_other_extras_are_ignored():
    a = IMSepLoss()(X, Y, T, semantic_features=E)
    b = IMSepLoss()(X, Y, T, semantic_features=E, logit_bias=torch.tensor(-3.0), index=torch.arange(2))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("semantic, message", [
    (None, "needs semantic_features"),
    (torch.randn(3, 4), "batch has 2 pairs"),
    (torch.randn(2), "must be a 2-d tensor"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "non-finite"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "non-finite"),
])
def test_bad_semantic_features_raise_clear_errors(semantic, message):
    with pytest.raises(ValueError, match=message):
        IMSepLoss()(X, Y, T, semantic_features=semantic)


def test_mismatched_features_raise():
    with pytest.raises(ValueError, match="same shape"):
        IMSepLoss()(X, Y[:1], T, semantic_features=E)

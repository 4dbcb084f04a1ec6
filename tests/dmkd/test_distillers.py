import math

import pytest
import torch
import torch.nn.functional as F

from dmkd import DMKDLoss, attention_mask, channel_attention, spatial_attention
from dmkd.distillers import build_distiller, method_parameters, reading_notes
from dmkd.distillers.fgd import foreground_background_masks
from dmkd.distillers.mgd import MGDLoss
from dmkd.errors import UserError


def test_spatial_attention_matches_the_formula():
    torch.manual_seed(0)
    feat = torch.randn(2, 3, 4, 5)
    t = 0.7
    got = spatial_attention(feat, t)
    assert got.shape == (2, 1, 4, 5)
    for n in range(2):
        means = [[sum(abs(feat[n, c, i, j].item()) for c in range(3)) / 3 for j in range(5)] for i in range(4)]
        denominator = sum(math.exp(m / t) for row in means for m in row)
        for i in range(4):
            for j in range(5):
                assert got[n, 0, i, j].item() == pytest.approx(20 * math.exp(means[i][j] / t) / denominator, rel=1e-5)


def test_channel_attention_matches_the_formula():
    torch.manual_seed(1)
    feat = torch.randn(2, 6, 3, 3)
    t = 0.5
    got = channel_attention(feat, t)
    assert got.shape == (2, 6, 1, 1)
    for n in range(2):
        means = [feat[n, c].abs().sum().item() / 9 for c in range(6)]
        denominator = sum(math.exp(m / t) for m in means)
        for c in range(6):
            assert got[n, c, 0, 0].item() == pytest.approx(6 * math.exp(means[c] / t) / denominator, rel=1e-5)


def test_topk_mask_has_the_exact_ratio_and_masks_the_right_side():
    torch.manual_seed(2)
    attention = torch.rand(3, 1, 8, 10)
    for ratio in (0.0, 0.25, 0.65, 1.0):
        mask = attention_mask(attention, ratio, "topk", "important")
        assert mask.shape == attention.shape and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (mask == 0).flatten(1).sum(1).tolist() == [round(ratio * 80)] * 3
    important = attention_mask(attention, 0.25, "topk", "important")
    unimportant = attention_mask(attention, 0.25, "topk", "unimportant")
    for n in range(3):
        values = attention[n].flatten()
        masked_hi, kept_hi = values[important[n].flatten() == 0], values[important[n].flatten() == 1]
        assert masked_hi.min() >= kept_hi.max()
        masked_lo, kept_lo = values[unimportant[n].flatten() == 0], values[unimportant[n].flatten() == 1]
        assert masked_lo.max() <= kept_lo.min()


def test_threshold_mask():
    attention = torch.tensor([[[[0.2, 1.5], [0.9, 1.4]]]])
    assert attention_mask(attention, 1.0, "threshold", "important").flatten().tolist() == [1, 0, 1, 0]
    assert attention_mask(attention, 1.0, "threshold", "unimportant").flatten().tolist() == [0, 1, 0, 1]


def test_bernoulli_mask_ratio_in_expectation_and_fresh_draws():
    torch.manual_seed(3)
    attention = spatial_attention(torch.randn(64, 8, 10, 10), 4.0)  # mild attention: probabilities below 1
    first = attention_mask(attention, 0.5, "bernoulli")
    second = attention_mask(attention, 0.5, "bernoulli")
    assert not torch.equal(first, second)
    expected = (0.5 * attention).clamp(0, 1).mean().item()
    assert (1 - first).mean().item() == pytest.approx(expected, abs=0.02)
    # the most attended entries are masked more often on the important side, less on the other
    top = attention.flatten(1) > attention.flatten(1).median(dim=1, keepdim=True).values
    unimportant = attention_mask(attention, 0.5, "bernoulli", "unimportant").flatten(1)
    assert (1 - first.flatten(1))[top].mean() > (1 - unimportant)[top].mean()
    assert (1 - unimportant).mean().item() == pytest.approx(expected, abs=0.02)


def _independent_dmkd(loss: DMKDLoss, student, teacher):
    """DMKD's steps 1-6 written out again from the formulas, using the module's weights."""
    aligned = F.conv2d(student, loss.align.weight, loss.align.bias)
    n, c, h, w = teacher.shape
    spatial = (h * w * torch.softmax(teacher.abs().mean(1).flatten(1) / loss.temperature, 1)).view(n, 1, h, w)
    channel = (c * torch.softmax(teacher.abs().mean((2, 3)) / loss.temperature, 1)).view(n, c, 1, 1)

    def top_mask(att, ratio):
        flat = att.flatten(1)
        k = round(ratio * flat.shape[1])
        order = flat.argsort(dim=1, descending=True)
        mask = torch.ones_like(flat)
        for i in range(n):
            mask[i, order[i, :k]] = 0
        return mask.view_as(att)

    def generate(block, x):
        return F.conv2d(F.relu(F.conv2d(x, block[0].weight, block[0].bias, padding=1)), block[2].weight,
                        block[2].bias, padding=1)

    g_s = generate(loss.spatial_generator, aligned * top_mask(spatial, loss.spatial_ratio))
    g_c = generate(loss.channel_generator, aligned * top_mask(channel, loss.channel_ratio))
    w_s, w_c = torch.softmax(loss.fusion_logits, 0)
    fused = w_s * g_s + w_c * g_c
    return fused, loss.alpha * ((fused - teacher) ** 2).sum() / n


def test_dmkd_loss_matches_an_independent_computation():
    torch.manual_seed(4)
    loss = DMKDLoss(6, 8, alpha=1e-3, temperature=0.8, spatial_ratio=0.5, channel_ratio=0.25)
    with torch.no_grad():
        loss.fusion_logits.copy_(torch.tensor([0.3, -0.2]))
    student, teacher = torch.randn(2, 6, 5, 7), torch.randn(2, 8, 5, 7)
    fused, expected = _independent_dmkd(loss, student, teacher)
    assert torch.allclose(loss.reconstruct(student, teacher), fused, atol=1e-5)
    assert loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)


def test_dmkd_gradients_reach_the_student_generators_and_fusion_but_not_the_teacher():
    torch.manual_seed(5)
    loss = DMKDLoss(8, 8)
    assert loss.align is None and loss.fusion_logits.shape == (2,)
    student = torch.randn(2, 8, 6, 6, requires_grad=True)
    teacher = torch.randn(2, 8, 6, 6, requires_grad=True)
    loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    for module in (loss.spatial_generator, loss.channel_generator):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert loss.fusion_logits.grad is not None and loss.fusion_logits.grad.abs().sum() > 0


def test_dmkd_variants():
    torch.manual_seed(6)
    student, teacher = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    spatial_only = DMKDLoss(4, 4, branches=("spatial",))
    assert spatial_only.channel_generator is None and spatial_only.fusion_logits is None
    mask, _ = spatial_only.masks(teacher)
    assert torch.allclose(spatial_only.reconstruct(student, teacher), spatial_only.spatial_generator(student * mask))
    channel_only = DMKDLoss(4, 4, branches=("channel",))
    assert channel_only.spatial_generator is None
    fixed = DMKDLoss(4, 4, fusion="fixed")
    assert fixed.fusion_logits is None and fixed.fusion_weights().tolist() == [0.5, 0.5]
    s_mask, c_mask = fixed.masks(teacher)
    expected = 0.5 * fixed.spatial_generator(student * s_mask) + 0.5 * fixed.channel_generator(student * c_mask)
    assert torch.allclose(fixed.reconstruct(student, teacher), expected)
    with pytest.raises(ValueError, match="branches"):
        DMKDLoss(4, 4, branches=("depth",))
    with pytest.raises(ValueError, match="mask_mode"):
        DMKDLoss(4, 4, mask_mode="random")


def test_every_dmkd_variant_and_join_carries_the_note_that_it_is_a_reading_and_the_baselines_none():
    (note,) = reading_notes(["dmkd_spatial", "dmkd+crosskd", "mgd", "dmkd"])  # said once, whichever variants
    assert "reading" in note and "2309.02719" in note
    assert reading_notes(["none", "fitnet", "mgd", "fgd", "pkd", "crosskd", "mgd+crosskd"]) == []


def test_mgd_mask_ratio_matches_lambda_in_expectation():
    torch.manual_seed(7)
    mgd = MGDLoss(4, 4, lambda_mgd=0.65)
    mask = mgd.random_mask(torch.zeros(256, 4, 16, 16))
    assert mask.shape == (256, 1, 16, 16)
    assert (1 - mask).mean().item() == pytest.approx(0.65, abs=0.01)


def test_fgd_foreground_mask_covers_the_boxes():
    boxes = [torch.tensor([[16.0, 8.0, 48.0, 40.0]]), torch.zeros(0, 4)]
    fg, bg = foreground_background_masks(boxes, (64, 64), 8, 8, torch.device("cpu"))  # stride 8
    inside = fg[0, 0] > 0
    assert inside[1:6, 2:7].all() and inside.sum() == 25  # cells 2..6 x 1..5
    assert fg[0, 0][inside].unique().tolist() == [pytest.approx(1 / 25)]
    assert bg[0, 0][inside].sum() == 0 and bg[0].sum().item() == pytest.approx(1.0)
    assert fg[1].sum() == 0 and bg[1].sum().item() == pytest.approx(1.0)


def test_pkd_loss_on_hand_checked_tensors():
    """One channel, four positions (batch 1, 2x2): the loss is weight (n-1)/n (1 - r) with the sample
    standard deviation, so at the two-stage weight 6, r = 0 gives 6 * 3/4 = 4.5, r = -1 gives 9, any
    positive affine copy 0."""
    from dmkd.distillers import PKDLoss

    loss = PKDLoss(1, 1, weight=6.0)  # no aligner at equal widths
    assert loss.align is None and not list(loss.parameters())
    teacher = torch.tensor([[[[1.0, 0.0], [-1.0, 0.0]]]])
    orthogonal = torch.tensor([[[[0.0, 1.0], [0.0, -1.0]]]])  # Pearson r = 0
    assert loss(orthogonal, teacher).item() == pytest.approx(4.5, rel=1e-5)
    assert loss(-teacher, teacher).item() == pytest.approx(9.0, rel=1e-5)
    assert PKDLoss(1, 1)(orthogonal, teacher).item() == pytest.approx(7.5, rel=1e-5)  # one-stage default 10
    assert loss(3 * teacher + 5, teacher).item() == pytest.approx(0.0, abs=1e-5)  # magnitude is not imitated
    # two channels, each standardised on its own: their mean; and the weight scales linearly
    pair_s, pair_t = torch.cat([orthogonal, 7 * teacher], 1), torch.cat([teacher, teacher], 1)
    assert PKDLoss(2, 2, weight=2.0)(pair_s, pair_t).item() == pytest.approx((1.5 + 0.0) / 2, rel=1e-5)


def test_build_distiller_errors_name_the_field():
    assert build_distiller("none", 8, 8, ["0"]) is None
    with pytest.raises(UserError, match="method: unknown method 'kd'; allowed: none, fitnet, pkd"):
        build_distiller("kd", 8, 8, ["0"])
    with pytest.raises(UserError, match=r"distill\.lambda_mgd: not a parameter of method 'dmkd'"):
        build_distiller("dmkd", 8, 8, ["0"], {"lambda_mgd": 0.5})
    with pytest.raises(UserError, match="mask_mode"):
        build_distiller("dmkd", 8, 8, ["0"], {"mask_mode": "sometimes"})
    assert "branches" not in method_parameters("dmkd_spatial") and "alpha" in method_parameters("dmkd_spatial")


def test_attention_png(tmp_path):
    from dmkd.visualize import render_attention

    features = {"0": torch.randn(1, 8, 12, 12), "1": torch.randn(1, 8, 6, 6)}
    path = render_attention(torch.rand(3, 96, 96), features, tmp_path / "attention.png",
                            **{k: v for k, v in method_parameters("dmkd").items()
                               if k in ("temperature", "spatial_ratio", "mask_mode", "masked")})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_parameters_are_typed_like_their_defaults():
    distiller = build_distiller("dmkd", 8, 8, ["0"], {"alpha": 1, "branches": ["spatial"], "spatial_ratio": 0.5})
    loss = distiller.levels["0"]
    assert loss.alpha == 1.0 and isinstance(loss.alpha, float) and loss.branches == ("spatial",)
    with pytest.raises(UserError, match=r"distill\.alpha: must be a number, but got '2e-5x'"):
        build_distiller("dmkd", 8, 8, ["0"], {"alpha": "2e-5x"})


def test_each_detector_family_starts_from_its_own_published_setting_and_names_it():
    """Golden: the values of the authors' configs, per family, each citing its config by name."""
    from dmkd.distillers import published
    from dmkd.distillers.fgd import FGDLoss

    fcos, retinanet = published("fgd", "fcos")["fgd"], published("fgd", "retinanet")["fgd"]
    assert fcos.values == {"temperature": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lambda_fgd": 8e-6}
    assert retinanet.values == {"temperature": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda_fgd": 5e-6}
    assert "fgd_fcos_r101_distill_fcos_r50_2x_coco.py" in fcos.source
    assert "fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py" in retinanet.source
    assert published("fgd", "two_stage")["fgd"].values["alpha"] == 5e-5
    assert method_parameters("pkd", "fcos")["weight"] == 10.0 and method_parameters("pkd", "two_stage")["weight"] == 6.0
    assert "pkd_fpn_retina_x101_retina_r50_2x_coco.py" in published("pkd", "retinanet")["pkd"].source
    assert "pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco.py" in published("pkd", "two_stage")["pkd"].source
    assert method_parameters("mgd", "two_stage") == {"alpha": 5e-7, "lambda_mgd": 0.45}
    assert "cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x_coco.py" in published("mgd", "two_stage")["mgd"].source
    assert "our reading" in published("dmkd", "fcos")["dmkd"].source  # no DMKD config is public
    assert published("fitnet", "fcos") == {}  # FitNet published no detection weight
    # what a run builds when it leaves the parameters unset: its student's family's values
    built = build_distiller("fgd", 16, 32, ["0"], family="fcos").levels["0"]
    assert isinstance(built, FGDLoss) and (built.temperature, built.alpha) == (0.8, 1.6e-3)
    assert build_distiller("fgd", 16, 32, ["0"], {"alpha": 2e-3}, family="fcos").levels["0"].alpha == 2e-3
    assert build_distiller("dmkd", 16, 32, ["0"], family="two_stage").levels["0"].spatial_ratio == 0.45


def test_a_tuning_run_starts_from_its_pairs_family_setting():
    from orchestrator.grid import load_grid, row_space
    from orchestrator.space import paper_default_point
    from orchestrator.space_file import load_space

    grid = load_grid("search_spaces/methods.yaml")  # the FCOS mini pair
    assert paper_default_point(row_space(grid, grid.rows["fgd"])) == {
        "temperature": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lambda_fgd": 8e-6}
    assert paper_default_point(row_space(grid, grid.rows["pkd"])) == {"weight": 10.0}
    two_stage = load_space("search_spaces/fasterrcnn_r50_r18_coco.yaml")  # alpha searched in [1e-7, 5e-6]
    assert paper_default_point(two_stage) == {"alpha": 5e-7, "temperature": 0.5, "spatial_ratio": 0.45,
                                              "channel_ratio": 0.45}


def test_channel_mask_overlap_and_masking_before_the_align_conv():
    from dmkd.distillers.dmkd import mask_overlap

    same = torch.ones(3, 4, 1, 1)
    same[:, :2] = 0
    assert mask_overlap(same) == pytest.approx(1.0)
    apart = torch.ones(2, 4, 1, 1)
    apart[0, :2], apart[1, 2:] = 0, 0
    assert mask_overlap(apart) == pytest.approx(0.0)
    half = torch.ones(2, 4, 1, 1)
    half[0, :2], half[1, 1:3] = 0, 0  # {0, 1} and {1, 2}: 1 shared of 3
    assert mask_overlap(half) == pytest.approx(1 / 3)

    torch.manual_seed(0)
    student, teacher = torch.randn(4, 8, 6, 6), torch.randn(4, 16, 6, 6)
    after = DMKDLoss(8, 16, branches=("channel",), channel_ratio=0.5)
    before = DMKDLoss(8, 16, branches=("channel",), channel_ratio=0.5, channel_mask="before_align")
    before.load_state_dict(after.state_dict())
    assert after(student, teacher).item() != pytest.approx(before(student, teacher).item())
    # before the align conv the mask covers the student's 8 channels, 4 of them masked per sample
    _, mask = before.masks(teacher, student)
    assert mask.shape == (4, 8, 1, 1) and (mask == 0).sum(dim=1).flatten().tolist() == [4] * 4
    assert 0 <= before.channel_overlap() <= 1 and "mask/channel_jaccard" in after.extra_metrics()
    with pytest.raises(ValueError, match="channel_mask must be one of"):
        DMKDLoss(8, 16, channel_mask="sideways")

import pytest
import torch

from vl_core import preprocess


def img(h, w, c=3, b=1):
    return torch.rand(b, h, w, c)


@pytest.mark.parametrize("shape,match", [
    ((2, 64, 64, 3), "batch of 2"), ((1, 64, 64, 4), "alpha"), ((1, 64, 64, 1), "1 channel"),
    ((1, 16, 64, 3), "at least 32"), ((1, 9000, 9000, 3), "downscale")])
def test_bad_images_get_actionable_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        preprocess.check_image(torch.zeros(1, 1, 1, shape[3]).expand(*shape))  # expand: no 9000² allocation


def test_non_finite_and_wrong_rank_images_are_refused():
    bad = img(64, 64)
    bad[0, 3, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        preprocess.check_image(bad)
    with pytest.raises(ValueError, match="IMAGE"):
        preprocess.check_image(torch.zeros(64, 64, 3))


@pytest.mark.parametrize("h,w,budget", [(1024, 1024, 1024), (1024, 768, 1024), (4000, 3000, 1024), (333, 777, 64),
                                        (32, 2000, 16), (100, 100, 1)])
def test_fit_budget_respects_budget_and_grid(h, w, budget):
    ph, pw = preprocess.plan_size(h, w, budget, "fit_budget")
    assert ph % 32 == 0 and pw % 32 == 0 and ph >= 32 and pw >= 32
    assert (ph // 32) * (pw // 32) <= budget
    assert ph <= max(h, 32) and pw <= max(w, 32)  # never upscales beyond snapping


def test_fit_budget_keeps_1024_square_at_1024_tokens_and_aspect():
    assert preprocess.plan_size(1024, 1024, 1024, "fit_budget") == (1024, 1024)
    h, w = preprocess.plan_size(3000, 1500, 1024, "fit_budget")
    assert abs(h / w - 2) < 0.1


def test_policy_none_refuses_over_budget_and_snaps():
    assert preprocess.plan_size(1000, 1010, 1024, "none") == (992, 1024)
    with pytest.raises(ValueError, match="max_image_tokens"):
        preprocess.plan_size(2048, 2048, 1024, "none")
    with pytest.raises(ValueError, match="resize policy"):
        preprocess.plan_size(64, 64, 4, "stretch")


def test_resize_is_identity_at_target_size():
    x = img(64, 96)[0]
    assert preprocess.resize_image(x, (64, 96)) is x
    assert preprocess.resize_image(x, (32, 64)).shape == (32, 64, 3)


def test_to_patches_layout_matches_merge_windows():
    x = torch.rand(64, 96, 3)
    patches, grid = preprocess.to_patches(x)
    assert grid.tolist() == [[1, 4, 6]] and patches.shape == (24, 3 * 2 * 16 * 16)
    # first row = the top-left 16×16 patch, channels-major, both temporal copies equal
    first = patches[0].reshape(3, 2, 16, 16)
    assert torch.allclose(first[:, 0], (x[:16, :16].permute(2, 0, 1) - 0.5) / 0.5)
    assert torch.equal(first[:, 0], first[:, 1])
    # row 1 is the patch to its right within the same 2×2 merge window, row 2 the one below
    assert torch.allclose(patches[1].reshape(3, 2, 16, 16)[:, 0], (x[:16, 16:32].permute(2, 0, 1) - 0.5) / 0.5)
    assert torch.allclose(patches[2].reshape(3, 2, 16, 16)[:, 0], (x[16:32, :16].permute(2, 0, 1) - 0.5) / 0.5)


def test_image_tokens_is_one_per_merged_patch():
    assert preprocess.image_tokens(1024, 1024) == 1024
    assert preprocess.image_tokens(64, 96) == 6
    assert preprocess.image_tokens(64, 96, patch_size=16, merge_size=1) == 24
    assert preprocess.image_tokens(1024, 768, 32, 1) == 32 * 24


@pytest.mark.parametrize("h,w,expected", [(64, 96, (64, 96)), (50, 70, (64, 64)), (20, 20, (64, 64)),
                                          (4000, 4000, (3584, 3584)), (33, 1000, (32, 992))])
def test_qwen_vl_resize_is_comfyuis_rule(h, w, expected):
    """Sides rounded to multiples of 32; scaled down past 12845056 px, up below 3136 px (ComfyUI's smart resize)."""
    got = preprocess.qwen_vl_resize(h, w)
    assert got == expected
    assert got[0] % 32 == 0 and got[1] % 32 == 0
    assert 3136 <= got[0] * got[1] <= 12845056


def test_rgba_hint_names_a_core_node():
    """The fix the alpha error suggests exists in ComfyUI 0.29: the core 'Split Image with Alpha' node."""
    with pytest.raises(ValueError, match=r"'Split Image with Alpha' node \(SplitImageWithAlpha\)") as ei:
        preprocess.check_image(img(64, 64, 4))
    assert "Image RGB" not in str(ei.value)


def test_fit_image_checks_plans_and_resizes():
    picture = preprocess.fit_image(img(100, 300), 16, "fit_budget")
    assert tuple(picture.shape) == (64, 192, 3) and preprocess.image_tokens(*picture.shape[:2]) <= 16
    same = img(64, 64)
    assert preprocess.fit_image(same, 1024, "fit_budget").data_ptr() == same[0].data_ptr()
    with pytest.raises(ValueError, match="unknown resize policy 'crop'"):
        preprocess.fit_image(same, 16, "crop")

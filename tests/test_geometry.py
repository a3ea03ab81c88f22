"""Geometry of DESIGN.md: direction of the warp, range of the offsets, margins."""
import cv2
import numpy as np
import pytest

from pipeline.dataset import geometry as g
from tests.conftest import textured_image

P = 128


def _image(seed=0):
    return cv2.cvtColor(cv2.resize(textured_image(np.random.default_rng(seed)), (320, 240)), cv2.COLOR_BGR2GRAY)


def _valid_mask(h_local, erode=3):
    """Pixels v of patch B whose H_local v lands inside patch A (eroded: away from interpolation edges)."""
    ones = np.ones((P, P), np.uint8)
    m = cv2.warpPerspective(ones, h_local, (P, P), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    return cv2.erode(m, np.ones((erode, erode), np.uint8)) > 0


@pytest.mark.parametrize("seed", range(5))
def test_warping_patch_a_by_h_local_reproduces_patch_b(seed):
    pair = g.generate_pairs(_image(seed), g.PairConfig(), "train", seed)[0]
    h = g.homography_local(pair.offsets, P)
    from_a = cv2.warpPerspective(pair.patch_a[..., 0], h, (P, P), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    valid = _valid_mask(h)
    assert valid.mean() > 0.3
    residual = np.abs(from_a.astype(float) - pair.patch_b[..., 0])[valid]
    assert residual.mean() < 0.5, residual.mean()
    # The opposite direction must not fit: this is the bug the test exists for.
    wrong = cv2.warpPerspective(pair.patch_a[..., 0], h, (P, P), flags=cv2.INTER_LINEAR)
    assert np.abs(wrong.astype(float) - pair.patch_b[..., 0])[valid].mean() > 10


def test_h_local_maps_corners_to_corners_plus_offsets():
    offsets = np.array([[3, -4], [-7.5, 2], [10, 11], [-32, 32]], np.float32)
    h = g.homography_local(offsets, P)
    np.testing.assert_allclose(g.offsets_from_homography(h, P), offsets, atol=1e-3)
    corners = g.patch_corners(50, 40, P)
    mapped = cv2.perspectiveTransform(corners[None].astype(np.float64), g.homography_ab(corners, offsets))[0]
    np.testing.assert_allclose(mapped, corners + offsets, atol=1e-3)


def test_window_warp_equals_warping_the_whole_image():
    img = _image(1)
    offsets = g.sample_offsets(np.random.default_rng(3), 32)
    h_ab = g.homography_ab(g.patch_corners(100, 50, P), offsets)
    fast = g.warp_window(img, h_ab, 100, 50, P)
    full = g.warp_full_image_window(img, h_ab, 100, 50, P)
    assert np.abs(fast.astype(int) - full).max() <= 1


def test_offsets_in_range_and_both_ends_reachable():
    rng = np.random.default_rng(0)
    draws = np.stack([g.sample_offsets(rng, 32) for _ in range(20000)])
    assert draws.dtype == np.float32 and draws.shape == (20000, 4, 2)
    assert draws.min() >= -32 and draws.max() <= 32
    assert draws.min() < -31.9 and draws.max() > 31.9
    # Mean and spread of U[-rho, rho]: 0 and rho/sqrt(3).
    assert abs(draws.mean()) < 0.2 and abs(draws.std() - 32 / np.sqrt(3)) < 0.2
    # The ends themselves are values the draw can return (closed interval, exact in float32).
    ends = g.offsets_from_steps(np.array([0, g.OFFSET_STEPS] * 4), 32)
    assert ends.min() == -32.0 and ends.max() == 32.0


def test_top_left_range_inclusive_and_nothing_from_outside_the_image():
    rng = np.random.default_rng(1)
    xy = np.array([g.sample_top_left(rng, 320, 240, P, 32) for _ in range(5000)])
    assert xy[:, 0].min() == 32 and xy[:, 0].max() == 320 - P - 32
    assert xy[:, 1].min() == 32 and xy[:, 1].max() == 240 - P - 32
    # Worst case: extreme position, every offset pushing outwards: every pixel of patch B is sampled
    # from inside the image, so a white image gives an all-white patch even with a black border.
    white = np.full((240, 320), 255, np.uint8)
    for x, y in [(32, 32), (320 - P - 32, 240 - P - 32)]:
        for sign in (-1, 1):
            offsets = np.full((4, 2), 32.0 * sign, np.float32)
            offsets[[0, 3], 0] = -32 if sign > 0 else 32
            h_ab = g.homography_ab(g.patch_corners(x, y, P), offsets)
            to_image = np.array([[1, 0, x], [0, 1, y], [0, 0, 1]], np.float64)
            b = cv2.warpPerspective(white, h_ab @ to_image, (P, P), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            assert b.min() == 255
    for _ in range(500):
        x, y = g.sample_top_left(rng, 320, 240, P, 32)
        quad = g.patch_corners(x, y, P) + g.sample_offsets(rng, 32)
        assert quad[:, 0].min() >= 0 and quad[:, 0].max() <= 320 and quad[:, 1].min() >= 0 and quad[:, 1].max() <= 240


def test_pairs_are_deterministic_per_image_and_differ_between_images_and_splits():
    img, cfg = _image(2), g.PairConfig(patches_per_image=3)
    a, b = g.generate_pairs(img, cfg, "train", 42), g.generate_pairs(img, cfg, "train", 42)
    assert all(np.array_equal(p.patch_b, q.patch_b) and np.array_equal(p.offsets, q.offsets) for p, q in zip(a, b))
    assert not np.array_equal(a[0].offsets, g.generate_pairs(img, cfg, "train", 43)[0].offsets)
    assert not np.array_equal(a[0].offsets, g.generate_pairs(img, cfg, "validation", 42)[0].offsets)
    assert [p.patch_index for p in a] == [0, 1, 2]


def test_colour_pairs_have_three_channels():
    img = cv2.resize(textured_image(np.random.default_rng(0)), (320, 240))
    pair = g.generate_pairs(img, g.PairConfig(channels=3, patches_per_image=1), "train", 1)[0]
    assert pair.patch_a.shape == pair.patch_b.shape == (P, P, 3)


def test_geometry_that_cannot_fit_is_refused():
    with pytest.raises(ValueError, match="cannot fit"):
        g.PairConfig(rho=60).validate()
    g.PairConfig(rho=56).validate()  # 128 + 112 = 240 fits exactly


def test_mace_identity_equals_mean_corner_norm():
    offsets = np.random.default_rng(0).uniform(-32, 32, (100, 8))
    expected = np.mean([np.mean(np.hypot(o[0::2], o[1::2])) for o in offsets])
    assert np.isclose(g.mace(np.zeros_like(offsets), offsets).mean(), expected)
    # E[MACE of identity] = 0.765 rho for U[-rho, rho] offsets (DESIGN.md).
    many = np.random.default_rng(1).uniform(-32, 32, (20000, 8))
    assert abs(g.mace(np.zeros_like(many), many).mean() / 32 - 0.765) < 0.01


def _residual(patch_a, patch_b, offsets):
    h = g.homography_local(offsets, P)
    from_a = cv2.warpPerspective(patch_a[..., 0], h, (P, P), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    return np.abs(from_a.astype(float) - patch_b[..., 0])[_valid_mask(h)].mean()


def _naive_view_offsets(offsets, view):
    """The tempting shortcut: permute the corners and flip signs, as if corners sat at pixel centres."""
    transpose, flip_x, flip_y = view
    o = np.asarray(offsets, np.float64).reshape(4, 2).copy()
    if flip_x:
        o = o[[1, 0, 3, 2]] * [-1, 1]
    if flip_y:
        o = o[[3, 2, 1, 0]] * [1, -1]
    if transpose:
        o = o[[0, 3, 2, 1]][:, ::-1]
    return o


@pytest.mark.parametrize("seed", range(3))
def test_views_of_a_pair_keep_their_label_exactly(seed):
    """Each of the 8 flips/transposes of a pair is a pair whose offsets view_offsets gives: patch A of the
    view warped by them reproduces patch B of the view; mapping back returns the original offsets."""
    pair = g.generate_pairs(_image(seed), g.PairConfig(), "train", seed)[1]
    assert len(set(g.VIEWS)) == 8
    naive_worse = 0
    for view in g.VIEWS:
        m = g.view_matrix(view, P)
        a, b = g.view_patches(pair.patch_a, view), g.view_patches(pair.patch_b, view)
        # view_patches is the pixel map M, without resampling
        assert np.array_equal(a[..., 0], cv2.warpPerspective(pair.patch_a[..., 0], m, (P, P), flags=cv2.INTER_NEAREST))
        o = g.view_offsets(pair.offsets, m, P)
        assert _residual(a, b, o) < 0.5
        np.testing.assert_allclose(g.view_offsets(o, np.linalg.inv(m), P), pair.offsets, atol=2e-3)
        naive_worse += _residual(a, b, _naive_view_offsets(pair.offsets, view)) > 2 * _residual(a, b, o) + 0.3
    assert naive_worse >= 4  # the flips are not corner permutations here (the transposes are)

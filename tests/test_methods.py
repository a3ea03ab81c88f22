"""The estimators of model.estimators (classical, learned, estimate) in DESIGN.md's convention, on pairs built by pipeline.dataset.geometry."""
import numpy as np
import pytest

from model.estimators import classical, estimate, learned, registry
from pipeline.dataset import geometry
from tests import conftest

CONFIG = geometry.PairConfig(patches_per_image=4)


@pytest.fixture(scope="module")
def textured_pairs():
    """12 grayscale pairs (rho 32) from 3 textured images, exactly as the builder makes them."""
    return conftest.textured_pairs(11, 3)


def score(method, pairs):
    estimates = [classical.estimate(method, p.patch_a, p.patch_b) for p in pairs]
    errors = geometry.mace(np.array([e.offsets for e in estimates]), np.array([p.offsets for p in pairs]))
    return errors, np.array([e.ok for e in estimates])


def test_true_h_local_scores_zero_and_its_inverse_does_not(textured_pairs):
    for p in textured_pairs:
        h = geometry.homography_local(p.offsets, CONFIG.patch_size)
        exact = estimate.from_homography(h, CONFIG.patch_size)
        assert exact.ok
        assert geometry.mace(exact.offsets, p.offsets)[0] < 1e-3
        # The wrong direction (A -> B) must not pass for the right one.
        inverse = estimate.from_homography(np.linalg.inv(h), CONFIG.patch_size)
        assert geometry.mace(inverse.offsets, p.offsets)[0] > 5


def test_identity_is_zero_offsets_and_its_mace_is_the_mean_offset_norm(textured_pairs):
    errors, ok = score("identity", textured_pairs)
    assert ok.all()
    expected = [np.mean([np.hypot(dx, dy) for dx, dy in p.offsets]) for p in textured_pairs]
    np.testing.assert_allclose(errors, expected, rtol=1e-6)


@pytest.mark.parametrize("method", ["orb", "sift", "ecc"])
def test_classical_methods_beat_the_identity_on_textured_pairs(textured_pairs, method):
    identity, _ = score("identity", textured_pairs)
    errors, ok = score(method, textured_pairs)
    assert ok.mean() >= 0.75, f"{method} failed on {np.sum(~ok)} of {len(ok)} textured pairs"
    assert errors.mean() < 0.25 * identity.mean(), (method, errors.mean(), identity.mean())
    assert np.median(errors) < 2.0, (method, np.median(errors))


def test_colour_patches_are_accepted(textured_pairs):
    p = textured_pairs[0]
    colour_a, colour_b = (np.repeat(x, 3, axis=-1) for x in (p.patch_a, p.patch_b))
    e = classical.estimate("sift", colour_a, colour_b)
    assert e.ok and geometry.mace(e.offsets, p.offsets)[0] < 2.0


def test_failures_fall_back_to_the_identity_and_say_why():
    flat = np.full((128, 128, 1), 90, np.uint8)
    for method in ("orb", "sift", "ecc"):
        e = classical.estimate(method, flat, flat)
        assert not e.ok and e.reason, method
        assert np.array_equal(e.offsets, np.zeros((4, 2), np.float32))
    for bad in (np.full((3, 3), np.nan), np.zeros((3, 3)), np.diag([1.0, -1.0, 1.0]),  # NaN, singular, flipped
                np.diag([10.0, 10.0, 1.0]), geometry.homography_local(np.full((4, 2), 80.0), 128)):
        e = estimate.from_homography(bad, 128)
        assert not e.ok and e.reason.startswith(("degenerate", "implausible")), (bad, e.reason)
        assert not e.offsets.any()


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown classical method"):
        classical.estimate("surf", np.zeros((8, 8, 1), np.uint8), np.zeros((8, 8, 1), np.uint8))


class _ConstantNetwork:
    """Stands in for a Keras model that says the same offsets for every pair."""

    def __init__(self, offsets, rho):
        self.out = np.asarray(offsets, np.float32).reshape(1, 8) / rho

    def predict_on_batch(self, x):
        return np.repeat(self.out, len(x), axis=0)


def test_sift_or_network_keeps_sift_where_it_works_and_the_network_where_it_fails(textured_pairs):
    guess = np.full((4, 2), 3.5, np.float32)  # what a network would have said
    ctx = registry.Context(model=_ConstantNetwork(guess, 32.0), rho=32.0)
    p = textured_pairs[0]
    flat = np.full_like(p.patch_a, 128)  # no features: SIFT fails, the network's offsets are used
    assert not classical.sift(flat, flat).ok
    a, b = np.stack([p.patch_a, flat]), np.stack([p.patch_b, flat])
    textured, plain = registry.run(["sift_or_network"], a, b, ctx)["sift_or_network"].estimates
    assert textured.ok and np.allclose(textured.offsets, classical.sift(p.patch_a, p.patch_b).offsets)
    assert textured.source == "sift" and not np.allclose(textured.offsets, guess)
    assert plain.ok and plain.source == "network" and np.allclose(plain.offsets, guess, atol=1e-5)


class _OracleNetwork:
    """Stands in for a Keras model: knows the true offsets of every view of the given pairs, so
    test-time augmentation must give back the truth exactly, and anything but the exact map-back fails."""

    def __init__(self, pairs, rho):
        from model.training import data

        self.table = {}
        a = np.stack([p.patch_a for p in pairs])
        b = np.stack([p.patch_b for p in pairs])
        for view in geometry.VIEWS:
            x = data.normalize(geometry.view_patches(a, view), geometry.view_patches(b, view))
            m = geometry.view_matrix(view, a.shape[1])
            for xi, p in zip(np.asarray(x), pairs):
                self.table[xi.tobytes()] = geometry.view_offsets(p.offsets, m, a.shape[1]).reshape(8) / rho

    def predict_on_batch(self, x):
        return np.stack([self.table[xi.tobytes()] for xi in np.asarray(x)])


def test_network_tta_maps_every_view_back_exactly(textured_pairs):
    pairs = textured_pairs[:6]
    truth = np.array([p.offsets for p in pairs])
    a, b = np.stack([p.patch_a for p in pairs]), np.stack([p.patch_b for p in pairs])
    oracle = _OracleNetwork(pairs, 32.0)
    np.testing.assert_allclose(learned.network_offsets(oracle, a, b, 32.0), truth, atol=1e-3)
    np.testing.assert_allclose(learned.network_offsets_tta(oracle, a, b, 32.0), truth, atol=2e-3)

"""ECC refinement (model.estimators.refine), the method grammar (registry) and the worker pool (parallel)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from model.estimators import classical, estimate, parallel, refine, registry
from pipeline.dataset import geometry
from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = geometry.PairConfig(patches_per_image=4)


@pytest.fixture(scope="module")
def pairs():
    """8 grayscale pairs (rho 32) of 2 smooth textured images, exactly as the builder makes them."""
    return conftest.textured_pairs(21, 2, blur_sigma=1.5)


def start_off_by(pair, pixels: float, seed: int) -> estimate.Estimate:
    """An estimate whose corners are each `pixels` px from the truth, in random directions."""
    angles = np.random.default_rng(seed).uniform(0, 2 * np.pi, 4)
    wrong = pair.offsets + pixels * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return estimate.from_homography(geometry.homography_local(wrong, CONFIG.patch_size), CONFIG.patch_size)


def mace(e, pair) -> float:
    return float(geometry.mace(e.offsets, pair.offsets)[0])


def test_pyramid_depth_comes_from_the_image_size():
    assert refine.pyramid_levels((128, 128)) == 2
    assert refine.pyramid_levels((680, 850)) == 4
    assert refine.pyramid_levels((1200, 1600), (1200, 1600)) == 5
    assert refine.pyramid_levels((40, 40)) == 1


def test_refinement_recovers_a_known_h_from_a_start_5_px_off(pairs):
    for k, pair in enumerate(pairs):
        start = start_off_by(pair, 5.0, k)
        assert mace(start, pair) == pytest.approx(5.0, abs=1e-3)
        e = refine.refine(pair.patch_a, pair.patch_b, start)
        assert e.ok and not e.kept_start, e.kept_why
        assert mace(e, pair) < 0.1, (k, mace(e, pair))
        assert e.correlation > e.start_correlation


def test_refinement_keeps_the_start_on_a_flat_patch():
    flat = np.full((128, 128, 1), 90, np.uint8)
    offsets = np.array([[3, -2], [1, 4], [-2, 2], [0, -3]], np.float32)
    start = estimate.from_homography(geometry.homography_local(offsets, 128), 128)
    e = refine.refine(flat, flat, start)
    assert e.kept_start and e.kept_why and e.ok
    assert np.array_equal(e.offsets, start.offsets) and np.array_equal(e.homography, start.homography)
    # A failed start stays failed: refinement from the identity finds nothing on a flat patch either.
    failed = classical.sift(flat, flat)
    e = refine.refine(flat, flat, failed)
    assert not e.ok and e.kept_start and e.reason == failed.reason


def test_a_refined_estimate_never_reports_a_lower_correlation_than_its_start(pairs):
    rng = np.random.default_rng(5)
    seen_kept = seen_refined = 0
    for k, pair in enumerate(pairs):
        # starts near and far: some refine, some cannot (30 px off is beyond a 2-level pyramid's reach)
        for pixels in (2.0, 12.0, 30.0):
            e = refine.refine(pair.patch_a, pair.patch_b, start_off_by(pair, pixels, int(rng.integers(1 << 30))))
            assert e.correlation >= e.start_correlation, (k, pixels, e.correlation, e.start_correlation)
            h = e.homography if e.homography is not None else np.eye(3)
            again = refine.correlations(pair.patch_a[..., 0], pair.patch_b[..., 0], [h])[0]
            if e.kept_start:
                seen_kept += 1
                assert e.correlation == e.start_correlation == pytest.approx(again, abs=1e-9)
            else:
                seen_refined += 1
    assert seen_refined >= len(pairs)


def test_method_names_compose():
    assert registry.parse("sift") == ("base", "sift")
    assert registry.parse("sift+ecc") == ("refine", "sift+ecc", ("base", "sift"))
    assert registry.parse("sift_or_network") == ("or", "sift_or_network", ("base", "sift"), ("base", "network"))
    # '+ecc' at the end refines everything before it; inside a chain, only its own member
    assert registry.parse("sift_or_network+ecc")[2] == registry.parse("sift_or_network")
    assert registry.parse("orb_default+ecc_or_network_tta") == (
        "or", "orb_default+ecc_or_network_tta", ("refine", "orb_default+ecc", ("base", "orb_default")),
        ("base", "network_tta"))
    assert registry.parse("auto")[0] == "best" and registry.needs_network("auto")
    assert not registry.needs_network("sift+ecc_or_orb") and registry.needs_network("sift_or_network_tta+ecc")
    assert registry.refines("auto") and registry.refines("sift+ecc") and not registry.refines("sift_or_network")
    assert registry.is_chain("sift_or_network+ecc") and registry.is_chain("auto") and not registry.is_chain("sift+ecc")


@pytest.mark.parametrize("name", ["surf", "sift+", "+ecc", "sift_or_", "_or_sift", "sift+ransac", "SIFT", ""])
def test_unknown_names_are_refused_with_one_line_listing_the_grammar(name):
    with pytest.raises(registry.MethodError) as info:
        registry.check([name] if name else [], with_network=True)
    message = str(info.value)
    assert "\n" not in message
    if name:
        assert f"unknown method '{name}'" in message and "X+ecc" in message and "X_or_Y" in message


def test_cli_refuses_an_unknown_name_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "model.evaluate", f"--data_dir={tmp_path}",
                           f"--output_dir={tmp_path}/r", "--methods=sift,sift+ransac"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("model.evaluate: error: ")]
    assert len(lines) == 1 and "unknown method 'sift+ransac'" in lines[0], proc.stderr[-2000:]


def test_a_pool_gives_the_same_estimates_in_the_same_order(pairs):
    a = np.stack([p.patch_a for p in pairs])
    b = np.stack([p.patch_b for p in pairs])
    names = ["sift", "sift+ecc", "orb_or_ecc+ecc"]
    alone = registry.run(names, a, b, registry.Context())
    with parallel.Pool(2) as pool:
        pooled = registry.run(names, a, b, registry.Context(pool=pool))
    for name in names:
        for x, y in zip(alone[name].estimates, pooled[name].estimates):
            assert np.array_equal(x.offsets, y.offsets) and x.ok == y.ok and x.source == y.source, name
            assert x.correlation == y.correlation and x.kept_why == y.kept_why, name
    # the chain's parts are shared and its cost includes them
    assert alone["sift+ecc"].seconds >= alone["sift"].seconds


def test_an_error_inside_a_worker_is_one_line(pairs):
    p = pairs[0]
    with parallel.Pool(2) as pool:
        jobs = [("classical", "sift", p.patch_a, p.patch_b, False), ("classical", "surf", p.patch_a, p.patch_b, False)]
        with pytest.raises(parallel.WorkerError) as info:
            parallel.run_jobs(jobs, pool)
    message = str(info.value)
    assert "\n" not in message and "pair 1" in message and "unknown classical method 'surf'" in message

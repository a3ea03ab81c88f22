"""model.predict: a known warp between two images of different sizes is recovered in their own pixel frames."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from model import evaluate_real, predict
from model.estimators import learned, photos
from model.estimators.estimate import resize_matrix
from pipeline.dataset import geometry
from tests.conftest import textured_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def warped_pair(tmp_path_factory):
    """A (400 x 300) and B (300 x 360), B(v) = A(H_true v), written as PNG files; H_true maps B -> A.

    H_true is built with pipeline.dataset.geometry: B's frame is squeezed onto a 256 x 256 square (a pure scale M),
    then the 4-point homography of geometry.homography_ab moves that square's corners by up to 24 px
    inside A. The truth is the matrix that made the warp, independent of predict's resizing.
    """
    root = tmp_path_factory.mktemp("predict")
    a = textured_image(np.random.default_rng(5), 400, 300)
    wb, hb = 300, 360
    corners = geometry.patch_corners(70, 22, 256)
    offsets = np.array([[-20, 10], [24, -16], [12, 18], [-14, -22]], np.float32)
    h_true = geometry.homography_ab(corners, offsets) @ np.array(
        [[256 / wb, 0, 70], [0, 256 / hb, 22], [0, 0, 1]], np.float64)
    b = cv2.warpPerspective(a, h_true, (wb, hb), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE)
    cv2.imwrite(str(root / "a.png"), a)
    cv2.imwrite(str(root / "b.png"), b)
    return str(root / "a.png"), str(root / "b.png"), h_true, (wb, hb)


def corner_errors(h_pred, h_true, size_b):
    """Where B's corners land in A under the prediction and the truth, distances in A's pixels."""
    w, h = size_b
    c = np.float64([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]).reshape(1, 4, 2)
    return np.linalg.norm(cv2.perspectiveTransform(c, h_pred) - cv2.perspectiveTransform(c, h_true), axis=-1)[0]


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_sift_recovers_a_known_warp_in_the_original_frames(warped_pair):
    path_a, path_b, h_true, size_b = warped_pair
    pred = predict.predict_homography(read(path_a), read(path_b), "sift", patch_size=128, channels=1)
    assert pred.ok, pred.reason
    # 128 px stands for 300-400 px here, so 1 px of the resized frame is ~3 px of the originals.
    errors = corner_errors(pred.homography, h_true, size_b)
    assert errors.max() < 3.0, errors
    # The identity of the resized frames is far off: the tolerance does discriminate.
    assert corner_errors(learned.to_photos(np.eye(3), (400, 300), size_b, 128), h_true, size_b).min() > 15


def test_scaling_back_is_exact_for_a_pure_resize(tmp_path):
    """B = A resized (S_b = S_a^-1 S): the scaled-back H of an exact H_local equals the resize itself."""
    for size_a, size_b in (((400, 300), (200, 150)), ((321, 257), (640, 480))):
        # An A pixel x lands at S_a x in the P frame; a B pixel at S_b x: B -> A is S_a^-1 S_b, and
        # H_local = I in the P frame.
        h = learned.to_photos(np.eye(3), size_a, size_b, 128)
        sa, sb = resize_matrix(size_a, (128, 128)), resize_matrix(size_b, (128, 128))
        np.testing.assert_allclose(h, np.linalg.inv(sa) @ sb, atol=1e-12)
        # S is cv2.resize's own pixel-centre mapping (x' = sx (x + 0.5) - 0.5): a smooth blob's centre
        # moves where S says. A plain x' = sx x would be off by (sx - 1) / 2, up to ~0.4 px here.
        yy, xx = np.mgrid[:size_a[1], :size_a[0]]
        centre = np.array([size_a[0] * 0.3, size_a[1] * 0.6])
        blob = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * 12.0 ** 2)).astype(np.float32)
        small = cv2.resize(blob, (128, 128), interpolation=cv2.INTER_AREA)
        yy, xx = np.mgrid[:128, :128]
        centroid = np.array([np.sum(xx * small), np.sum(yy * small)]) / small.sum()
        np.testing.assert_allclose(centroid, (sa @ [*centre, 1.0])[:2], atol=0.05)


def run_cli(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "model.predict", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_prints_h_and_draws(warped_pair, tmp_path):
    path_a, path_b, h_true, size_b = warped_pair
    out = tmp_path / "vis.png"
    proc = run_cli("--method=sift", f"--image_a={path_a}", f"--image_b={path_b}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.strip().startswith(("[[", "[")) and "]" in line]
    h = np.array([[float(v) for v in r.replace("[", " ").replace("]", " ").split()] for r in rows[:3]])
    assert h.shape == (3, 3)
    assert corner_errors(h, h_true, size_b).max() < 3.0
    vis = cv2.imread(str(out))
    assert vis is not None and vis.shape[1] > 400 + 300


def test_network_without_model_dir_uses_the_shipped_weights(warped_pair):
    from model import network

    path_a, path_b, _, _ = warped_pair
    proc = run_cli(f"--image_a={path_a}", f"--image_b={path_b}")
    if network.shipped_model_dir() is None:
        assert proc.returncode == 2 and "needs --model_dir" in proc.stderr and "Traceback" not in proc.stderr
        assert network.SHIPPED_MODEL_DIR in proc.stderr, proc.stderr[-2000:]
    else:
        # the default method is the best chain (auto); it says which of its members answered
        assert proc.returncode == 0 and "H (auto;" in proc.stdout, proc.stderr[-2000:]
        assert "method auto: answered by " in proc.stdout and "final correlation" in proc.stdout


def test_cli_errors(warped_pair, tmp_path):
    path_a, _, _, _ = warped_pair
    for args, needle in (([f"--image_a={path_a}", f"--image_b={tmp_path}/none.png", "--method=sift"], "cannot read"),
                         ([f"--image_a={path_a}", f"--image_b={path_a}", f"--model_dir={tmp_path}"],
                          "cannot load a model")):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert f"model.predict: error: " in proc.stderr and needle in proc.stderr, proc.stderr[-2000:]
    not_an_image = tmp_path / "x.png"
    not_an_image.write_bytes(b"not an image at all")
    proc = run_cli(f"--image_a={not_an_image}", f"--image_b={path_a}", "--method=orb")
    assert proc.returncode == 2 and "image_a" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_classical_path_at_full_resolution_agrees_with_evaluate_real(warped_pair, tmp_path):
    """The same pair as an Oxford sequence (image 1 = B, image 2 = A: H1to2p is B -> A): model.evaluate_real's
    H for sift and sift+ecc is predict's, and both are far more precise than the old P x P squeeze (3 px)."""
    path_a, path_b, h_true, size_b = warped_pair
    seq = tmp_path / "pair"
    seq.mkdir()
    cv2.imwrite(str(seq / "img1.png"), cv2.imread(path_b))
    cv2.imwrite(str(seq / "img2.png"), cv2.imread(path_a))
    np.savetxt(seq / "H1to2p", h_true / h_true[2, 2])
    report = evaluate_real.evaluate_real(str(seq), str(tmp_path / "report"), methods=["sift", "sift+ecc"],
                                         figures=False)
    for method, tolerance in (("sift", 1.0), ("sift+ecc", 0.25)):
        pred = predict.predict_homography(read(path_a), read(path_b), method)
        assert pred.ok, pred.reason
        from_report = report["pairs"][0]["methods"][method]
        np.testing.assert_allclose(from_report["homography"], pred.homography / pred.homography[2, 2],
                                   rtol=1e-6, atol=1e-8)
        assert corner_errors(pred.homography, h_true, size_b).mean() == pytest.approx(from_report["error"], abs=2e-3)
        assert corner_errors(pred.homography, h_true, size_b).max() < tolerance, (method, from_report["error"])
    assert pred.answered_by in ("sift+ecc", "sift") and pred.correlation is not None


def test_photos_above_the_bound_are_worked_on_downscaled_and_mapped_back_exactly(warped_pair, monkeypatch):
    path_a, path_b, h_true, size_b = warped_pair
    full = predict.predict_homography(read(path_a), read(path_b), "sift+ecc")
    monkeypatch.setattr(photos, "MAX_SIDE", 150)  # both photos are now worked on at half size or less
    small, scale = photos.working_copy(cv2.imread(path_a))
    assert max(small.shape[:2]) == 150 and not np.array_equal(scale, np.eye(3))
    pred = predict.predict_homography(read(path_a), read(path_b), "sift+ecc")
    assert pred.ok, pred.reason
    # in full-resolution pixels: 1 px of the copies is 2-2.7 px of the photos
    assert corner_errors(pred.homography, h_true, size_b).max() < 1.5
    assert not np.allclose(pred.homography, full.homography, atol=1e-6)  # it did run on the copies


def png_header(width, height):
    """A PNG that is only its header: Pillow reads its size, nothing can decode it."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_cli_bounds_before_any_work(warped_pair, tmp_path):
    path_a, path_b, _, _ = warped_pair
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(10001, 10000))
    for args, needle in (([f"--output={tmp_path}/vis", "--method=sift"], "--output"),
                         (["--method=sift+ransac"], "unknown method 'sift+ransac'"),
                         (["--method=sift", "--workers=0"], "--workers"),
                         (["--method=sift", "--patch_size=0"], "patch_size")):
        proc = run_cli(f"--image_a={path_a}", f"--image_b={path_b}", *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("model.predict: error: ")]
        assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    proc = run_cli(f"--image_a={huge}", f"--image_b={path_b}", "--method=sift")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"image_a {huge}: 10001x10000 pixels" in proc.stderr and "100 MP" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "vis").exists()

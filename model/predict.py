"""The homography between two photos of any size, with the network or a classical method.

  python -m model.predict [--model_dir=RUN] --image_a=A.jpg --image_b=B.jpg [--output=VIS.png]
                          [--method=network|sift|orb|ecc]          (no --model_dir: the shipped weights)
  python -m model.predict --method=sift --image_a=A.jpg --image_b=B.jpg      (no model: --patch_size, --color)

Prints H, the 3x3 homography that maps a pixel of image B to its position in image A (the direction of
DESIGN.md's H_local), and with --output draws B's outline mapped into A, beside B.

How the sizes are handled. Both images are decoded and converted exactly as the dataset builder does
(grayscale, or BGR colour when the run was trained with --color; pipeline.builder.coco.decode_resize) and resized
to the model's input, P x P (P = the run's patch_size, 128), whatever their size and aspect ratio. The
method estimates H_local on these P x P images (B -> A). With S_a and S_b the matrices that take an
original pixel of A and of B to the resized frame,

    S = [[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1]],   sx = P / width, sy = P / height

(pixel centres at integer coordinates, as OpenCV's resize and warpPerspective place them:
x' = sx (x + 1/2) - 1/2), the homography between the original images is

    H = S_a^-1 · H_local · S_b

(B's pixel -> resized B -> resized A -> A's pixel). The network saw 128 px crops of 320 x 240 images in
training, so a whole photo squeezed to 128 x 128 is a different (coarser) input; it still works while the
motion between the photos is within about rho of the resized frame. The classical methods run on the
same resized images so that the comparison is fair, and predict_homography below is the same code path
that model.evaluate scores (model.estimators.methods).
"""
from __future__ import annotations

import dataclasses
import sys

import cv2
import numpy as np
from absl import flags

from model.estimators import methods as methods_lib
from pipeline.builder import coco
from pipeline.dataset import geometry
from pipeline.runtime import cli


class PredictError(ValueError):
    """A prediction that cannot run; the message names the problem."""


def scale_matrix(width: int, height: int, size: int) -> np.ndarray:
    """S: an original pixel (x, y) of a width x height image -> its position after resizing to size x size."""
    sx, sy = size / width, size / height
    return np.array([[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1]], np.float64)


def to_original_frames(h_local: np.ndarray, size_a: tuple, size_b: tuple, patch_size: int) -> np.ndarray:
    """H = S_a^-1 H_local S_b, normalised so H[2, 2] = 1. size_* = (width, height) of the originals."""
    h = np.linalg.inv(scale_matrix(*size_a, patch_size)) @ np.asarray(h_local, np.float64) \
        @ scale_matrix(*size_b, patch_size)
    return h / h[2, 2]


def load_image(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise PredictError(f"cannot read {path}: {e.strerror or e}") from e


def model_input(data: bytes, patch_size: int, channels: int, name: str = "image") -> tuple:
    """(P x P x C uint8 input converted like the builder does, (width, height) of the original)."""
    try:
        small = coco.decode_resize(data, patch_size, patch_size, channels)
    except coco.ImageError as e:
        raise PredictError(f"{name}: {e}") from e
    # The original size, decoded with the same flag (so EXIF orientation is applied the same way).
    original = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    return small.reshape(patch_size, patch_size, channels), (original.shape[1], original.shape[0])


@dataclasses.dataclass(frozen=True)
class Prediction:
    homography: np.ndarray  # H, 3x3: a pixel of image B -> its position in image A (original sizes)
    h_local: np.ndarray     # the same in the P x P resized frames
    offsets: np.ndarray     # (4, 2), H_local(c) - c, as evaluated
    ok: bool                # False: the method failed and H is the identity of the resized frames
    reason: str


def predict_patches(method: str, patch_a: np.ndarray, patch_b: np.ndarray, *, model=None,
                    rho: float | None = None) -> tuple:
    """(offsets (4, 2), ok, reason) on one P x P pair: the call model.evaluate scores, one pair at a time."""
    if method in ("network", "network_tta"):
        if model is None or rho is None:
            raise PredictError(f"method '{method}' needs a model (--model_dir)")
        fn = methods_lib.network_offsets_tta if method == "network_tta" else methods_lib.network_offsets
        offsets = fn(model, patch_a[None], patch_b[None], rho, batch_size=8)[0]
        if not np.isfinite(offsets).all():  # a diverged model: the identity, as evaluation scores it
            return np.zeros((4, 2), np.float32), False, "non-finite output"
        return offsets, True, ""
    try:
        e = methods_lib.estimate(method, patch_a, patch_b)
    except ValueError as err:
        raise PredictError(str(err)) from err
    return e.offsets, e.ok, e.reason


def predict_homography(image_a: bytes, image_b: bytes, method: str, *, patch_size: int = 128, channels: int = 1,
                       model=None, rho: float | None = None) -> Prediction:
    """H between two encoded images of any size (B -> A), through the P x P frame (see the module docstring)."""
    a, size_a = model_input(image_a, patch_size, channels, "image_a")
    b, size_b = model_input(image_b, patch_size, channels, "image_b")
    offsets, ok, reason = predict_patches(method, a, b, model=model, rho=rho)
    # The 4-point form defines H_local exactly, for the network and the homography methods alike.
    h_local = geometry.homography_local(offsets, patch_size)
    return Prediction(to_original_frames(h_local, size_a, size_b, patch_size), h_local,
                      np.asarray(offsets, np.float32).reshape(4, 2), ok, reason)


def draw(image_a: bytes, image_b: bytes, h: np.ndarray, path: str, label: str) -> None:
    """Side by side: A with B's outline mapped in by H (red), and B with its outline (red)."""
    a = cv2.imdecode(np.frombuffer(image_a, np.uint8), cv2.IMREAD_COLOR)
    b = cv2.imdecode(np.frombuffer(image_b, np.uint8), cv2.IMREAD_COLOR)
    hb, wb = b.shape[:2]
    outline_b = np.float64([[0, 0], [wb - 1, 0], [wb - 1, hb - 1], [0, hb - 1]]).reshape(1, 4, 2)
    in_a = cv2.perspectiveTransform(outline_b, h).reshape(4, 2)
    thick = max(2, round(max(a.shape[:2]) / 300))
    # A's canvas grows to hold the whole mapped outline, which may leave A.
    lo = np.floor(np.minimum(in_a.min(0), 0)).astype(int)
    hi = np.ceil(np.maximum(in_a.max(0), [a.shape[1] - 1, a.shape[0] - 1])).astype(int)
    lo, hi = np.maximum(lo, -2 * np.array(a.shape[1::-1])), np.minimum(hi, 3 * np.array(a.shape[1::-1]))
    canvas_a = np.full((hi[1] - lo[1] + 1, hi[0] - lo[0] + 1, 3), 255, np.uint8)
    canvas_a[-lo[1]:-lo[1] + a.shape[0], -lo[0]:-lo[0] + a.shape[1]] = a
    cv2.polylines(canvas_a, [np.round(in_a - lo).astype(np.int32)], True, (0, 0, 255), thick, cv2.LINE_AA)
    b = b.copy()
    cv2.polylines(b, [np.round(outline_b.reshape(4, 2)).astype(np.int32)], True, (0, 0, 255), thick, cv2.LINE_AA)
    height = max(canvas_a.shape[0], b.shape[0])
    pad = lambda im: cv2.copyMakeBorder(im, 0, height - im.shape[0], 0, 10, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    out = np.hstack([pad(canvas_a), pad(b)])
    cv2.putText(out, label, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 255), 2, cv2.LINE_AA)
    if not cv2.imwrite(path, out):
        raise PredictError(f"cannot write {path}")


FLAGS = flags.FLAGS


def _define_flags():
    """Defined when the CLI runs, not at import: other modules (pipeline.build, model.train) use the same names."""
    flags.DEFINE_string("model_dir", None, "Training run (model.keras + config.json) for --method=network; "
                        "default: the project's shipped weights (data/weights/compact_rho32)")
    flags.DEFINE_string("image_a", None, "First image (any size, any format OpenCV reads)")
    flags.DEFINE_string("image_b", None, "Second image")
    flags.DEFINE_string("output", None, "Optional PNG: B's outline mapped into A, beside B")
    flags.DEFINE_enum("method", "network", ["network", "network_tta", "sift", "orb", "orb_default", "ecc", "identity"],
                      "Estimator (network_tta: the network on the pair's 8 flips and transposes, averaged)")
    flags.DEFINE_integer("patch_size", 128, "Input size P for a classical method without --model_dir")
    flags.DEFINE_bool("color", False, "Colour input for a classical method without --model_dir")


def _fail(message: str) -> int:
    return cli.fail("model.predict", message)


def main(argv):
    if len(argv) > 1:
        return _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.image_a or not FLAGS.image_b:
        return _fail("--image_a and --image_b are required")
    try:
        model, rho = None, None
        patch_size, channels = FLAGS.patch_size, 3 if FLAGS.color else 1
        model_dir = FLAGS.model_dir
        if FLAGS.method in ("network", "network_tta") and not model_dir:
            from model import network

            model_dir = network.shipped_model_dir()  # the project's trained weights, where this checkout has them
            if not model_dir:
                raise PredictError(f"--method={FLAGS.method} needs --model_dir (this checkout has no shipped weights in "
                                   f"{network.SHIPPED_MODEL_DIR}), or pick --method=sift|orb|ecc")
        if model_dir:
            model, run = _load(model_dir)
            patch_size, channels, rho = int(run["patch_size"]), int(run["channels"]), float(run["rho"])
        a, b = load_image(FLAGS.image_a), load_image(FLAGS.image_b)
        pred = predict_homography(a, b, FLAGS.method, patch_size=patch_size, channels=channels, model=model, rho=rho)
        if FLAGS.output:
            draw(a, b, pred.homography, FLAGS.output, FLAGS.method if pred.ok else f"{FLAGS.method}: FAILED")
    except PredictError as e:
        return _fail(str(e))
    if not pred.ok:
        print(f"warning: {FLAGS.method} failed ({pred.reason}); H is the identity of the resized frames",
              file=sys.stderr)
    print(f"H ({FLAGS.method}; maps a pixel of {FLAGS.image_b} to {FLAGS.image_a}):")
    with np.printoptions(precision=6, suppress=True):
        print(pred.homography)
    if FLAGS.output:
        print(f"drawing: {FLAGS.output}")
    return 0


def _load(model_dir: str):
    from model import evaluate

    try:
        return evaluate.load_run(model_dir)
    except evaluate.EvaluationError as e:
        raise PredictError(str(e)) from e


def run():
    cli.run("model.predict", main, _define_flags)


if __name__ == "__main__":
    run()

"""The homography between two photos of any size, by any method of model.estimators.registry.

  python -m model.predict --image_a=A.jpg --image_b=B.jpg [--method=auto] [--model_dir=RUN] [--output=VIS.png]
  python -m model.predict --method=sift+ecc --image_a=A.jpg --image_b=B.jpg    (no network: no model needed)

Prints which method answered (a chain's member), the final correlation of a refined method, and H, the
3x3 homography that maps a pixel of image B to its position in image A (the direction of DESIGN.md's
H_local); with --output it draws B's outline mapped into A, beside B. The default method is `auto`: the
network, the network on 8 views and SIFT, each refined by ECC, keeping the one whose alignment
correlates best (BUILD_NOTES.md section 4 measures it against each of its parts). Without --model_dir the
network is the project's shipped weights.

Sizes (model.estimators.photos). The classical methods and refinement run on the photos as given; a photo
whose long side is above 1600 px is worked on downscaled to 1600 px and H mapped back exactly
(H = S_a^-1 . H_small . S_b). The network sees each photo squeezed to its P x P input, converted as the
dataset builder converts (grayscale, or BGR colour for a --color run), and its H_local is mapped to the
photos' pixels, H = S_a^-1 . H_local . S_b with S = [[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1]],
sx = P / width, sy = P / height (pixel centres at integers, as cv2.resize maps them); `+ecc` refines it
there, at full resolution. The network saw 128 px crops of 320 x 240 images in training, so a squeezed
photo is a coarser input: alone it is meaningful while the motion stays within about rho of that frame.

Bounds, checked before any work, each refused with one line naming the file or flag and exit status 2:
an unknown method name; --output whose extension OpenCV cannot write; an encoded photo above 512 MiB or
above 100 megapixels.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import cv2
import numpy as np
from absl import flags

from model.estimators import parallel, photos, registry
from pipeline.runtime import cli

DEFAULT_METHOD = "auto"


class PredictError(ValueError):
    """A prediction that cannot run; the message names the problem."""


def load_image(path: str) -> bytes:
    try:
        if os.path.getsize(path) > photos.MAX_FILE_BYTES:
            raise PredictError(f"{path}: {os.path.getsize(path)} bytes, more than the {photos.MAX_FILE_BYTES} "
                               f"accepted")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise PredictError(f"cannot read {path}: {e.strerror or e}") from e


@dataclasses.dataclass(frozen=True)
class Prediction:
    homography: np.ndarray  # H, 3x3: a pixel of image B -> its position in image A (original sizes)
    ok: bool                # False: the method failed and H is the identity
    reason: str
    answered_by: str        # the method that answered (a chain's member; X when X+ecc kept X's start)
    correlation: float | None  # refined methods: ECC correlation of the final alignment
    kept_start: str         # why refinement kept its start ("" when it did not, or nothing was refined)
    seconds: float


def predict_homography(image_a: bytes, image_b: bytes, method: str, *, patch_size: int = 128, channels: int = 1,
                       model=None, rho: float | None = None, workers: int = 1,
                       names: tuple = ("image_a", "image_b")) -> Prediction:
    """H between two encoded photos of any size (B -> A), in their own pixels (see the module docstring).
    patch_size, channels: the network's input (its run's); workers: processes for the per-pair work;
    names: how errors name the two photos."""
    try:
        registry.parse(method)
        if registry.needs_network(method) and (model is None or rho is None):
            raise PredictError(f"method '{method}' needs a model (--model_dir)")
        a = photos.decode(image_a, channels, names[0])
        b = photos.decode(image_b, channels, names[1])
        ctx = registry.Context(model=model, rho=rho, patch_size=patch_size, channels=channels, whole=True)
        with parallel.Pool(workers) as pool:
            result = photos.estimate([method], a, b, dataclasses.replace(ctx, pool=pool))[method]
    except (registry.MethodError, photos.PhotoError, parallel.WorkerError) as e:
        raise PredictError(str(e)) from None
    e = result.estimates[0]
    return Prediction(e.homography if e.ok else np.eye(3), e.ok, e.reason, e.source, e.correlation,
                      e.kept_why if e.kept_start else "", result.seconds)


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
    flags.DEFINE_string("model_dir", None, "Training run (model.keras + config.json) for the methods that use the "
                        "network; default: the project's shipped weights (data/weights/compact_rho32)")
    flags.DEFINE_string("image_a", None, "First image (any size up to 100 megapixels, any format OpenCV reads)")
    flags.DEFINE_string("image_b", None, "Second image")
    flags.DEFINE_string("output", None, "Optional image file (.png, .jpg, ...): B's outline mapped into A, beside B")
    flags.DEFINE_string("method", DEFAULT_METHOD, f"Estimator; {registry.GRAMMAR}")
    flags.DEFINE_integer("workers", 1, "Processes for the per-pair work (1: this process)")


def _fail(message: str) -> int:
    return cli.fail("model.predict", message)


def _check_flags() -> None:
    """The bounds that need no image: PredictError (one line) before any work."""
    if not FLAGS.image_a or not FLAGS.image_b:
        raise PredictError("--image_a and --image_b are required")
    try:
        registry.parse(FLAGS.method)
    except registry.MethodError as e:
        raise PredictError(f"--method: {e}") from None
    if FLAGS.output is not None and not cv2.haveImageWriter(FLAGS.output):
        raise PredictError(f"--output={FLAGS.output}: not an image file name OpenCV can write "
                           f"(give it an extension such as .png or .jpg)")
    if FLAGS.workers < 1:
        raise PredictError(f"--workers must be >= 1, got {FLAGS.workers}")


def main(argv):
    if len(argv) > 1:
        return _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        _check_flags()
        model, run, model_dir = None, {}, FLAGS.model_dir
        if registry.needs_network(FLAGS.method) and not model_dir:
            from model import network

            model_dir = network.shipped_model_dir()  # the project's trained weights, where this checkout has them
            if not model_dir:
                raise PredictError(f"--method={FLAGS.method} needs --model_dir (this checkout has no shipped weights "
                                   f"in {network.SHIPPED_MODEL_DIR}), or pick --method=sift|sift+ecc|orb|ecc")
        if model_dir:
            model, run = _load(model_dir)
        a, b = load_image(FLAGS.image_a), load_image(FLAGS.image_b)
        pred = predict_homography(a, b, FLAGS.method, patch_size=int(run.get("patch_size", 128)),
                                  channels=int(run.get("channels", 1)), model=model,
                                  rho=float(run["rho"]) if run else None, workers=FLAGS.workers,
                                  names=(f"image_a {FLAGS.image_a}", f"image_b {FLAGS.image_b}"))
        if FLAGS.output:
            draw(a, b, pred.homography, FLAGS.output,
                 f"{FLAGS.method}: {pred.answered_by}" if pred.ok else f"{FLAGS.method}: FAILED")
    except PredictError as e:
        return _fail(str(e))
    if not pred.ok:
        print(f"warning: {FLAGS.method} failed ({pred.reason}); H is the identity", file=sys.stderr)
    print(summary_line(FLAGS.method, pred))
    print(f"H ({FLAGS.method}; maps a pixel of {FLAGS.image_b} to {FLAGS.image_a}):")
    with np.printoptions(precision=6, suppress=True):
        print(pred.homography)
    if FLAGS.output:
        print(f"drawing: {FLAGS.output}")
    return 0


def summary_line(method: str, pred: Prediction) -> str:
    line = f"method {method}: answered by {pred.answered_by or method}"
    if pred.correlation is not None:
        line += f", final correlation {pred.correlation:.4f}"
    if pred.kept_start:
        line += f" (refinement kept the start: {pred.kept_start})"
    return line + f"; {pred.seconds:.2f} s"


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

"""Deep homography estimation: Beam dataset builder (pipeline/) and HomographyNet training (model/).

Also usable as Dataflow's --setup_file: workers install the same pinned stack.
"""
import setuptools

REQUIRED = [
    "tensorflow==2.21.*",
    "tensorboard==2.21.*",  # TF 2.21 no longer pulls it in; `tensorboard --logdir RUN/logs`
    "apache-beam[gcp,dask]==2.77.*",  # dask: --runner=DaskRunner on a dask.distributed cluster
    "google-crc32c",
    "opencv-python-headless==5.0.*",
    "numpy<2.5",
    "protobuf>=6,<7",
    "pycocotools",
    "absl-py",
    "matplotlib",
    "scikit-image",
]

setuptools.setup(
    name="deep-homography",
    version="0.1.0",
    description="COCO -> sharded TFRecord homography pairs (Apache Beam) and HomographyNet training (tf.data + Keras)",
    python_requires=">=3.10,<3.13",
    packages=setuptools.find_packages(include=["pipeline", "pipeline.*", "model", "model.*", "data", "data.*", "bench", "bench.*"]),
    install_requires=REQUIRED,
    # The trained weights that ship with the project (model.network.SHIPPED_MODEL_DIR), in non-editable installs too.
    package_data={"data": ["weights/*/*"]},
    # torch: for the tests of the PyTorch reader (pipeline.reader.torch_dataset); its CPU build is all they need.
    # jax[cpu]: Keras 3 on JAX (tests/test_model_jax.py); 0.10 leaves numpy, ml_dtypes and protobuf as TF pins them.
    # tensorflow-datasets: tests/test_tfds.py loads builds with TFDS (4.9.4+ runs beside TF 2.21 and protobuf 6).
    extras_require={"test": ["pytest", "pytest-xdist", "torch==2.13.0", "jax[cpu]==0.10.*",
                             "tensorflow-datasets==4.9.10"]},
)

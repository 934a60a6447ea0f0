"""radam-dist: RectifiedAdam / Lookahead for Keras 3 and distributed TensorFlow."""

from setuptools import find_packages, setup

setup(
    name="radam-dist",
    version="0.1.0",
    description="RAdam and Lookahead for Keras 3, faithful to tensorflow-addons, for "
    "tf.distribute, Horovod and a gRPC parameter server",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["radam_dist", "radam_dist.*"]),
    install_requires=["tensorflow>=2.16", "keras>=3.3", "numpy"],
    extras_require={"ps": ["grpcio", "grpcio-health-checking", "protobuf"]},
    entry_points={
        "console_scripts": [
            "radam-dist=radam_dist.cli:main",
            "radam-ps=radam_dist.ps.cli:main",
        ]
    },
)

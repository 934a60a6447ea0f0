"""The build step of radam-dist; the metadata, extras and entry points are in pyproject.toml.

setuptools reads both: pyproject.toml's [project] for what the package is, this file for how
``build_py`` makes it. The wheel carries generated gRPC stubs: ``build_py`` runs
grpc_tools.protoc on protos/radam_dist/ps/v1/ps.proto and writes ``ps_pb2.py``,
``ps_pb2_grpc.py``, ``__init__.py`` and ``ps.proto`` itself into
``<build>/radam_dist/ps/_generated/``: the installed package never needs to write anything at
run time. Nothing in the source tree is touched. Stubs a developer generated into the checkout
are never packaged (they may be stale): the build always regenerates them. An editable install
(``pip install -e .``) generates nothing here: the checkout regenerates its own stubs on first
import (radam_dist/ps/protogen.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO = ROOT / "protos" / "radam_dist" / "ps" / "v1" / "ps.proto"
GENERATED = Path("radam_dist") / "ps" / "_generated"


def _protogen():
    """radam_dist/ps/protogen.py, loaded by path: building must not import the package."""
    spec = importlib.util.spec_from_file_location(
        "_radam_dist_protogen", ROOT / "radam_dist" / "ps" / "protogen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPy(build_py):
    """build_py plus the parameter-server stubs, generated into the build directory."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable checkout regenerates its own stubs (protogen)
            return
        out = Path(self.build_lib) / GENERATED
        _protogen().generate_into(out, PROTO, include_proto=True)
        self._generated = [str(out / name) for name in
                           ("__init__.py", "ps_pb2.py", "ps_pb2_grpc.py", "ps.proto")]

    def get_outputs(self, include_bytecode=1):
        return list(super().get_outputs(include_bytecode)) + list(getattr(self, "_generated", []))


setup(cmdclass={"build_py": BuildPy})

"""The gRPC stubs are generated, not committed: from protos/ at build time or on first import."""

import shutil
import subprocess
import sys

import pytest

from ps_helpers import REPO


def test_stubs_generate_into_a_fresh_tree_and_are_reused(tmp_path):
    (tmp_path / "radam_dist" / "ps").mkdir(parents=True)
    shutil.copy(REPO / "radam_dist" / "ps" / "protogen.py", tmp_path / "radam_dist" / "ps")
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    script = tmp_path / "radam_dist" / "ps" / "protogen.py"
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True, timeout=120)
    generated = tmp_path / "radam_dist" / "ps" / "_generated"
    grpc_stub = (generated / "ps_pb2_grpc.py").read_text()
    assert "from radam_dist.ps._generated import ps_pb2" in grpc_stub
    assert "class ParameterServerStub" in grpc_stub
    assert "radam_dist.ps.v1" in (generated / "ps_pb2.py").read_text()
    stamp = (generated / "ps_pb2.py").stat().st_mtime_ns
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True, timeout=120)
    assert (generated / "ps_pb2.py").stat().st_mtime_ns == stamp  # current: not regenerated
    assert sorted(p.name for p in generated.iterdir()) == ["__init__.py", "ps_pb2.py", "ps_pb2_grpc.py"]


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_generated_code_is_git_ignored():
    done = subprocess.run(["git", "check-ignore", "-q", "radam_dist/ps/_generated/ps_pb2.py"], cwd=REPO)
    assert done.returncode == 0

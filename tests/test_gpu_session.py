"""scripts/gpu_session.sh all --dry-run (issue 20, point 7): the whole GPU session is one command whose time boxes fit
8 minutes, ordered by value, and every file it names exists (a renamed test or benchmark fails here, not on the GPU)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_all_dry_run_prints_the_plan_within_eight_minutes():
    proc = subprocess.run(["bash", "scripts/gpu_session.sh", "all", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stages = re.findall(r"^  (\S+)\s+(\d+) s  (.*)$", proc.stdout, flags=re.MULTILINE)
    names = [name for name, _, _ in stages]
    assert names[:2] == ["build", "gpu-tests"] and names[-1] == "e2e-7b-decode", names
    assert sum(int(box) for _, box, _ in stages) <= 8 * 60
    for _, _, command in stages:
        for path in re.findall(r"(?:tests|benchmarks)/[\w/]+\.py", command):
            assert (REPO / path).is_file(), f"gpu_session.sh names {path}, which does not exist"

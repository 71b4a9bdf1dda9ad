"""Every method's output on a tiny model equals the recorded one (tests/method_outputs.py, tests/data/).

Recorded before the one-pipeline redesign (issue 16) so that the redesign is proven to change nothing. A change that
is meant to alter a method's output re-records (`python tests/method_outputs.py --record`) in the commit that makes
it, and says why in its message.
"""

import json

import pytest
import torch
from method_outputs import CASES, RECORD, compress_case, numerics_sha256, probes, state_sha256

RECORDED = json.loads(RECORD.read_text())
SAME_NUMERICS = RECORDED["numerics_sha256"] == numerics_sha256()

# Probes are float64 dot products of float32 weights: a rounding difference of the decomposition on another CPU
# moves them by ~1e-6 relative; any change of rank, basis, base or statistics moves them by > 1e-2.
PROBE_RTOL = 1e-4


def test_the_record_covers_every_case():
    assert sorted(RECORDED["cases"]) == sorted(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_method_output_is_unchanged(name, tmp_path):
    model = compress_case(name, tmp_path)
    recorded = RECORDED["cases"][name]
    got = probes(model)
    assert sorted(got) == sorted(recorded["probes"]), "a different set of targeted layers"
    for key, values in recorded["probes"].items():
        want = torch.tensor(values, dtype=torch.float64)
        have = torch.tensor(got[key], dtype=torch.float64)
        error = (have - want).norm() / want.norm()
        assert error <= PROBE_RTOL, f"{name}: {key} moved by {error:.2e} (relative)"
    if SAME_NUMERICS:  # this machine's float kernels give the recording machine's bits: the output must too
        assert state_sha256(model) == recorded["state_sha256"], f"{name}: state dict is not bit-identical"

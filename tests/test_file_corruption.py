"""File-level corruptions of a saved model (truncated or flipped safetensors, broken or reshaped manifest, renamed or
dropped layers) each fail with one ValueError that names the file (issue 21, part 4, file side)."""

import json
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_corrupt_models import _load_and_judge, saved  # noqa: F401

from lowrank_ops.serialization import MANIFEST, WEIGHTS


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_file_level_corruptions(saved, tmp_path, data):  # noqa: F811
    source, logits = saved
    path = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    shutil.copytree(source, path)
    kind = data.draw(st.sampled_from(["truncate", "flip header", "flip data", "bad json", "no layers", "rename layer",
                                      "drop entry", "manifest list"]))
    weights = (path / WEIGHTS).read_bytes()
    header = 8 + int.from_bytes(weights[:8], "little")
    manifest = json.loads((path / MANIFEST).read_text())
    if kind == "truncate":
        (path / WEIGHTS).write_bytes(weights[: data.draw(st.integers(0, len(weights) - 1))])
    elif kind == "flip header":
        at = data.draw(st.integers(0, header - 1))
        b = bytearray(weights)
        b[at] ^= data.draw(st.integers(1, 255))
        (path / WEIGHTS).write_bytes(bytes(b))
    elif kind == "flip data":  # a tensor's bytes: only the manifest's sha256 tells
        at = data.draw(st.integers(header, len(weights) - 1))
        b = bytearray(weights)
        b[at] ^= data.draw(st.integers(1, 255))
        (path / WEIGHTS).write_bytes(bytes(b))
    elif kind == "bad json":
        text = (path / MANIFEST).read_text()
        (path / MANIFEST).write_text(text[: data.draw(st.integers(0, len(text) - 1))])
    elif kind == "no layers":
        del manifest["layers"]
        (path / MANIFEST).write_text(json.dumps(manifest))
    elif kind == "manifest list":
        (path / MANIFEST).write_text("[]")
    else:
        name = data.draw(st.sampled_from(sorted(manifest["layers"])))
        entry = manifest["layers"].pop(name)
        if kind == "rename layer":
            manifest["layers"][data.draw(st.sampled_from([name + "x", "model.layers.9.mlp.up_proj", "lm_head.x",
                                                          "model.norm"]))] = entry
        (path / MANIFEST).write_text(json.dumps(manifest))
    outcome = _load_and_judge(path, logits)
    assert outcome == "error" or kind == "flip header"


def test_a_manifest_without_a_digest_still_loads(saved, tmp_path):  # noqa: F811
    """Models saved before weights_sha256 existed load as before."""
    source, logits = saved
    shutil.copytree(source, tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / MANIFEST).read_text())
    assert set(manifest.pop("weights_sha256")) == {WEIGHTS}
    (tmp_path / "old" / MANIFEST).write_text(json.dumps(manifest))
    assert _load_and_judge(tmp_path / "old", logits) == "exact"

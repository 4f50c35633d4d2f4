"""Inputs the fuzzer found that crashed a parser (docs/fuzzing.md), each now refused with the
error its module declares; one test per finding, on the smallest input that shows it.

The fuzzer's own reproducers are replayed by tests/unit/test_fuzz_replay.py; these tests state
each rule in words and check the message the user sees.
"""

from __future__ import annotations

import io
import tarfile

import pytest

from harness import scenario as scn
from harness.errors import ErrorCode, NitroError
from harness.images import docker_archive as da


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


# -- docker save / OCI archives -------------------------------------------------------------------


def test_docker_archive_truncated_inside_a_member_is_e48(tmp_path):
    # tarfile reads members lazily, so the archive opens and fails while listing its names.
    raw = _tar({"manifest.json": b"[]", "blob": b"x" * 5000})
    path = tmp_path / "img.tar"
    path.write_bytes(raw[:512 * 4])
    with pytest.raises(NitroError) as info:
        da.open_image_archive(path)
    assert info.value.code == ErrorCode.EifBuildingError
    assert info.value.message == (f"{path}: archive: is truncated or corrupt (unexpected end "
                                  "of data)")


# -- scenario files -------------------------------------------------------------------------------


def test_scenario_file_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    path = tmp_path / "case.yaml"
    path.write_bytes(b"image: hello\nsteps:\n  - sleep: 1 # caf\xe9\n")
    with pytest.raises(scn.ScenarioError) as info:
        scn.load_scenarios(path)
    assert info.value.code == ErrorCode.InvalidArgument
    assert info.value.line == 3
    assert info.value.message.endswith(":3: not UTF-8 text (byte 38: 0xe9)")

"""The README's pytest example, verbatim, so the documented usage keeps working."""

import pytest


@pytest.mark.enclave(image="python", memory_mib=1024, cpu_count=2, debug_mode=True)
def test_guest_sees_only_lo(enclave):
    result = enclave.exec("ls /sys/class/net", timeout=60)
    assert result.output.split() == ["lo"]

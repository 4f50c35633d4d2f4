"""The serial console: capture, expect with failure patterns, and exec against a real shell."""

import subprocess
import sys

import pytest

from harness.console import Console, ConsoleFailure, ConsoleTimeout

# A real /bin/sh whose stdin/stdout/stderr are the console socket, as the guest's shell would be.
SHELL = (
    "import os, socket, sys\n"
    "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
    "for fd in (0, 1, 2): os.dup2(s.fileno(), fd)\n"
    "os.execvp('sh', ['sh'])\n"
)


@pytest.fixture
def shell_console(tmp_path):
    console = Console(tmp_path / "console.sock", tmp_path / "console.log")
    console.listen()
    proc = subprocess.Popen([sys.executable, "-c", SHELL, str(tmp_path / "console.sock")])
    console.attach(timeout=10)
    yield console
    console.close()
    proc.kill()
    proc.wait()


def test_exec_returns_status_and_output(shell_console):
    result = shell_console.exec("echo one; echo two", timeout=10)
    assert result.status == 0
    assert result.output == "one\ntwo"
    failed = shell_console.exec("ls /nonexistent-dir >/dev/null 2>&1", timeout=10)
    assert failed.status != 0
    assert shell_console.exec("exit_code() { return 7; }; exit_code", timeout=10).status == 7
    background = shell_console.exec("sleep 0.1 & echo \"it's\" started", timeout=10)
    assert background.status == 0 and background.output == "it's started"


def test_expect_counts_and_logs(shell_console, tmp_path):
    shell_console.write(b"for i in 1 2 3; do echo tick $i; done\n")
    match = shell_console.expect(r"tick (\d)", timeout=10, count=3)
    assert match.group(1) == "3"
    assert "tick 2" in (tmp_path / "console.log").read_text()


def test_failure_pattern_fails_at_once(shell_console):
    shell_console.write(b"echo 'Kernel panic - not syncing: test'\n")
    with pytest.raises(ConsoleFailure) as err:
        shell_console.expect(r"never printed", timeout=30)
    assert "Kernel panic" in str(err.value)
    assert "not syncing" in err.value.excerpt


def test_timeout_names_pattern(shell_console):
    with pytest.raises(ConsoleTimeout) as err:
        shell_console.expect(r"never printed", timeout=0.5)
    assert "never printed" in str(err.value)


def test_closed_console_fails_instead_of_waiting(tmp_path):
    console = Console(tmp_path / "c.sock", tmp_path / "c.log")
    console.listen()
    proc = subprocess.Popen([sys.executable, "-c", SHELL, str(tmp_path / "c.sock")])
    console.attach(timeout=10)
    console.write(b"exit 0\n")
    with pytest.raises(ConsoleFailure) as err:
        console.expect("never", timeout=30)
    assert "closed" in str(err.value)
    proc.wait()
    console.close()
    assert not (tmp_path / "c.sock").exists()


def test_kernel_messages_spliced_into_a_commands_output_are_removed():
    from harness.console import without_kernel_messages

    # As captured in an isolation probe under TCG: printk inside the program's line.
    out = ("vsock-result 2:errno104\nvsock-result 3:ok[    3.066880] hrtimer: interrupt took "
           "28420768 ns\n\n[   12.000001] a whole kernel line\nPLAINTEXT: aGk=\n")
    assert without_kernel_messages(out) == "vsock-result 2:errno104\nvsock-result 3:ok\nPLAINTEXT: aGk=\n"
    assert without_kernel_messages("[not a message] kept\n") == "[not a message] kept\n"

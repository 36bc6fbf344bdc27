"""Host-side checks of the QEMU harness: vm-tests/run boots the 6.12 test kernel.

The first call may build the kernel (several minutes, once per machine; cached in
/var/cache/erofs-tools-vm).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "vm-tests" / "run"
CI = os.environ.get("EROFS_TOOLS_CI") == "1"

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", autouse=True)
def _prerequisites():
    missing = [t for t in ("qemu-system-x86_64", "mkfs.ext4") if not shutil.which(t)]
    if missing:
        if CI:
            pytest.fail(f"vm tests need {missing}")
        pytest.skip(f"vm tests need {missing}")


def vmrun(*command, kernel="6.12"):
    return subprocess.run([str(RUN), "--kernel", kernel, "--", *command],
                          capture_output=True, text=True, timeout=3000)


def test_true_exits_zero():
    r = vmrun("true")
    assert r.returncode == 0, r.stderr[-3000:]


def test_false_exit_status_propagates():
    r = vmrun("false")
    assert r.returncode == 1, r.stderr[-3000:]
    r = vmrun("sh", "-c", "echo out; echo err >&2; exit 7")
    assert r.returncode == 7, r.stderr[-3000:]
    assert "out" in r.stdout and "err" in r.stdout


def test_scratch_writable_in_guest():
    script = ('set -e; test "$VMTEST_GUEST" = 1; echo hello > "$VMTEST_SCRATCH/probe"; '
              'cat "$VMTEST_SCRATCH/probe"; '
              'awk -v m="$VMTEST_SCRATCH" \'$2 == m {print "fstype=" $3}\' /proc/mounts; '
              'uname -r')
    r = vmrun("sh", "-c", script)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "hello" in r.stdout
    assert "fstype=ext4" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("6.12.")

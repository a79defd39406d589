"""alignkit.train.heap: the fixed glibc mmap threshold every training stage sets in setup_run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from alignkit.train import heap

# In a fresh process: free an 8 MiB block (glibc's dynamic threshold then rises to 8 MiB), then ask for
# 600 KiB, a micro-batch's hidden states on SmolLM2. Prints whether that block was mmapped (returned to
# the OS on free) or carved from the heap (whose holes glibc keeps).
PROBE = """
import ctypes, sys
from alignkit.train.heap import fix_mmap_threshold
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "fixed":
    print("set", fix_mmap_threshold())
libc.free(libc.malloc(8 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(600 << 10)
print("mmapped", libc.mallinfo2().hblks - before)
libc.free(block)
"""


def probe(mode: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", heap.ENV)}
    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          env={**base, **env}).stdout


@pytest.mark.skipif(not heap.GLIBC, reason="glibc only")
def test_fixed_threshold_mmaps_sub_mib_blocks_that_the_dynamic_one_puts_on_the_heap():
    assert "mmapped 0" in probe("dynamic")  # glibc's default: the 8 MiB free raised the threshold
    assert probe("fixed") == "set 524288\nmmapped 1\n"
    assert probe("fixed", **{heap.ENV: "off"}) == "set None\nmmapped 0\n"
    assert probe("fixed", MALLOC_MMAP_THRESHOLD_="1048576") == "set None\nmmapped 0\n"  # the user's own wins


def test_threshold_from_env(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv(heap.ENV, raising=False)
    assert heap.threshold_from_env() == 512 * 1024
    monkeypatch.setenv(heap.ENV, "262144")
    assert heap.threshold_from_env() == 262144
    for off in ("off", "0", "OFF"):
        monkeypatch.setenv(heap.ENV, off)
        assert heap.threshold_from_env() is None
    for bad, says in (("lots", "not a number of bytes"), ("99999999999", "outside glibc's range")):
        monkeypatch.setenv(heap.ENV, bad)
        with pytest.raises(ValueError, match=says) as err:
            heap.threshold_from_env()
        assert heap.ENV in str(err.value) and "'off'" in str(err.value)


def test_every_stage_sets_it_in_setup_run(tmp_path, monkeypatch):
    from alignkit.config import load_config
    from alignkit.train import common

    calls = []
    monkeypatch.setattr(common, "fix_mmap_threshold", lambda: calls.append(1))
    common.setup_run(load_config(None, ["stage=sft", "model_name_or_path=unused", "dataset=unused",
                                       f"output_dir={tmp_path / 'run'}", "report_to=none"]))
    assert calls == [1]

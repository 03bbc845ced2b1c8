"""keep_freed_memory: large freed blocks stay in the process instead of going back to the OS."""

import subprocess
import sys

import pytest

# mallinfo2 (glibc >= 2.33): hblkhd is the memory held in blocks mmapped one by one, which free()
# hands straight back to the operating system.
PROBE = """
import ctypes, sys
import torch
import glassformer as gf

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert gf.keep_freed_memory()
if sys.argv[1] == "cache":  # a first run_with_cache asks for it
    model = gf.Transformer(gf.Config(d_model=8, n_layers=1, n_heads=2, d_vocab=10, n_ctx=8))
    model.run_with_cache(torch.tensor([[1, 2, 3]]))
block = torch.empty(64 * 2**20 // 4)  # 64 MiB, twice glibc's largest default mmap threshold
print(libc.mallinfo2().hblkhd >= 64 * 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_blocks_come_from_the_reusable_heap_once_asked(monkeypatch):
    def mmapped(mode):
        return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout

    assert mmapped("default").strip() == "True"  # by default: its own mapping, unmapped when freed
    assert mmapped("keep").strip() == "False"  # after the call: from the heap, kept when freed
    assert mmapped("cache").strip() == "False"  # the first activation cache asked for it
    monkeypatch.setenv("GLASSFORMER_KEEP_FREED_MEMORY", "0")
    assert mmapped("cache").strip() == "True"  # unless the environment says no

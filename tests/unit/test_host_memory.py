"""A training worker's freed large buffers go back to the system (raybm.train.host_memory)."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                  "keepcost")
    ]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "worker":
    from raybm.train.host_memory import return_large_blocks_to_system
    return_large_blocks_to_system()
libc.free(ctypes.c_void_p(libc.malloc(20 << 20)))  # glibc's own threshold would now rise past 20 MiB
block = libc.malloc(10 << 20)  # an FSDP step's gathered layer, say
print(libc.mallinfo2().hblkhd >> 20)  # MiB mapped on their own: handed back when freed
"""


def _mapped_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_workers_large_blocks_are_mapped_on_their_own_after_glibc_raised_its_threshold():
    assert _mapped_mib("plain") == 0  # what happens without it: the 10 MiB block sits on the heap
    assert _mapped_mib("worker") == 10

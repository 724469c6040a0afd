"""How a training worker's process hands host memory back to the system (glibc's allocator;
nothing happens elsewhere).

glibc serves allocations below its mmap threshold from heaps it keeps after they are freed,
and raises that threshold up to 32 MiB as large blocks are freed. A sharded (FSDP) step
gathers each layer's weights and gradients into fresh buffers of tens of MiB and frees them
a moment later: with the moving threshold they land on the heaps, which only grow (measured
on a 0.4B model over 3 gloo workers: 0.6 GB more resident memory a worker after 3 steps)."""

import ctypes

# Blocks of 8 MiB and more are mapped on their own and unmapped when freed (no step slower).
MMAP_THRESHOLD_BYTES = 8 * 1024 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): its allocator does what it does
        return None


def return_large_blocks_to_system() -> None:
    """From now on, this process's blocks of ``MMAP_THRESHOLD_BYTES`` or more go straight
    back to the system when freed, and the threshold no longer moves. Called once by every
    training worker before it builds its model."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_freed_memory() -> None:
    """Hand the heap memory freed so far back to the system (rank 0's whole copy of the
    model, freed once sharded, would otherwise stay in its resident memory for the whole run)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)

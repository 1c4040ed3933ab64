"""CPU weight storage in transparent huge pages (Linux).

A decode step streams every compressed weight from DRAM once. In 4 KiB pages that is a TLB miss
(whose page walk also misses the caches once the weights exceed them) and a hardware-prefetcher
restart every 4 KiB; in 2 MiB pages both go away. Torch allocates with ``malloc`` and leaves
transparent huge pages to the system setting, which on most distributions is ``madvise``: memory
gets huge pages only where a program asks. :class:`~flashsparse.SparseLinear` asks for its
components: :func:`in_huge_pages` copies a CPU tensor into a private anonymous mapping aligned to
2 MiB and advised ``MADV_HUGEPAGE``. Only the pages the tensor touches are backed, so the
alignment costs address space, not memory. ``FLASHSPARSE_HUGE_PAGES=0`` (or ``false``, ``no``,
``off``) turns it off.
"""

from __future__ import annotations

import contextlib
import mmap
import sys

import torch

from . import backends

ENV_VAR = "FLASHSPARSE_HUGE_PAGES"
HUGE_PAGE = 2 << 20
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_supported: bool | None = None


def _system_supports() -> bool:
    global _supported
    if _supported is None:
        ok = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
        if ok:
            try:
                with open(_THP_SETTING) as f:
                    ok = "[never]" not in f.read()
            except OSError:
                ok = False
        _supported = ok
    return _supported


def enabled() -> bool:
    """Whether :func:`in_huge_pages` moves tensors: Linux with transparent huge pages not set to
    ``never``, and ``FLASHSPARSE_HUGE_PAGES`` not off."""
    off = backends.getenv(ENV_VAR, "").strip().lower() in ("0", "false", "no", "off")
    return not off and _system_supports()


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (same shape, dtype and values, contiguous) in memory advised for
    transparent huge pages, or ``t`` itself where that does not apply: not a plain CPU tensor,
    under 2 MiB (it could not fill a huge page), already 2 MiB-aligned (as this function's
    copies are: a layer re-registering its components does not copy them again), not enabled
    here, or the mapping failed."""
    nbytes = t.numel() * t.element_size()
    if (
        type(t) is not torch.Tensor
        or t.device.type != "cpu"
        or t.requires_grad
        or nbytes < HUGE_PAGE
        or (t.is_contiguous() and t.data_ptr() % HUGE_PAGE == 0)
        or not enabled()
    ):
        return t
    try:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError):
        return t
    # The tensor keeps the mapping alive (torch.frombuffer holds the buffer until the storage
    # is freed), so the storage is exactly the tensor's bytes and saves as such.
    base = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
    offset = -base % HUGE_PAGE
    with contextlib.suppress(OSError):  # refused: still correct memory, in small pages
        region.madvise(mmap.MADV_HUGEPAGE, offset, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    raw = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)
    out = raw.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out

"""Resident pages of tensors mmap'd from .safetensors files: which tensors are file-backed, and
giving their pages back once a packed or quantised copy replaces them (Linux; a no-op elsewhere).

The loader (weights.py) maps checkpoint files privately and assigns views of them as parameters. When
a layer is prepacked or quantised, the original pages would stay resident (counted in RSS) until the
mapping closes; madvise(MADV_DONTNEED) on the pages wholly inside the tensor returns them, and a later
read faults them back in from the file. Anonymous memory is never touched.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch


class MappedPages:
    """The safetensors mappings of this process, read once from /proc/self/maps. A tensor still in use
    (a tied embedding) is released only after checking that its bytes equal the file's: a private
    mapping's edited pages would otherwise be lost."""

    _MADV_DONTNEED = 4
    _CHUNK = 8 << 20

    def __init__(self) -> None:
        self.maps: list[tuple[int, int, int, str]] = []  # (start, end, file offset, path)
        self.libc = None
        self.released = 0  # bytes
        if not sys.platform.startswith("linux"):
            return
        try:
            self.libc = ctypes.CDLL(None, use_errno=True)
            with open("/proc/self/maps") as maps:
                for line in maps:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].strip().endswith(".safetensors"):
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self.maps.append((lo, hi, int(parts[2], 16), parts[5].strip()))
        except OSError:
            self.libc, self.maps = None, []

    def _mapping(self, tensor: torch.Tensor) -> tuple[int, int, int, str] | None:
        if self.libc is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return None
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        return next((m for m in self.maps if m[0] <= start and end <= m[1]), None)

    def file_backed(self, tensor: torch.Tensor) -> bool:
        return self._mapping(tensor) is not None

    def _equals_file(self, tensor: torch.Tensor, mapping: tuple[int, int, int, str]) -> bool:
        flat = tensor.detach().reshape(-1).view(torch.uint8)
        offset = tensor.data_ptr() - mapping[0] + mapping[2]
        buffer = bytearray(min(self._CHUNK, flat.numel()))
        disk = torch.frombuffer(buffer, dtype=torch.uint8)
        with open(mapping[3], "rb") as f:
            f.seek(offset)
            for i in range(0, flat.numel(), self._CHUNK):
                n = min(self._CHUNK, flat.numel() - i)
                if f.readinto(memoryview(buffer)[:n]) != n or not torch.equal(disk[:n], flat[i:i + n]):
                    return False
        return True

    def release(self, tensor: torch.Tensor, in_use: bool = False) -> int:
        """Release the tensor's whole pages if it lies in a safetensors mapping; returns bytes released.
        in_use=True: only when its bytes still equal the file (so reads after the release are correct)."""
        mapping = self._mapping(tensor)
        if mapping is None or (in_use and not self._equals_file(tensor, mapping)):
            return 0
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, end // page * page  # pages wholly inside [start, end)
        if hi <= lo or self.libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), self._MADV_DONTNEED):
            return 0
        self.released += hi - lo
        return hi - lo

    def releaser(self, in_use: bool):
        """release() with in_use fixed, for the row-block callbacks of the swaps."""
        return lambda rows: self.release(rows, in_use=in_use)

"""Linear: nn.Linear plus an optional CPU-prepacked copy of its weight; every projection is one.

torch's bf16 CPU linear re-lays the weight out into oneDNN's blocked format on every call; with a
few activation rows (decode) that costs as much as the matmul itself. `prepack()` makes the blocked
copy once. `forward` uses it only when nothing needs a gradient and the weight is still the tensor it
was packed from (same storage, same version counter: an optimizer step or `load_state_dict` makes it
stale, and `.to()` drops it), otherwise it is plain `F.linear`. The two give bit-identical outputs:
the packed kernel runs only for few rows (decode), where it matches F.linear bit for bit.
`.weight` stays a normal parameter, so state_dict, saving and fine-tuning are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# rows of the weight packed per block: the 151,936-row vocabulary matrix is packed in 5 blocks, so a
# caller releasing the source block by block never holds a second full copy of it
_PACK_ROWS = 32768
# oneDNN picks the blocked layout for an expected row count. Measured on a 2-core AMX Xeon (2B shapes):
# a layout for 1024 rows is as fast at decode (1-8 rows) as one for 1 row and, unlike it, gives
# F.linear's exact bits for 2-32 rows at every 2B shape (the 1-row layout already differs at 4 rows for
# in_features 8960). A single row at in_features 8960 (and 3584, the 7B's) differs with every layout:
# F.linear takes another oneDNN path there, so those shapes stay unpacked. Above 32 rows (prefill) the
# packed kernel can round differently, so those calls run F.linear on the weight itself. The limit is
# probed per shape and machine at prepack time (_exact_rows).
_PACK_BATCH_HINT = 1024
_PACKED_MAX_ROWS = 32
_PROBE_ROWS = (1, 2, 4, 8, 16, 32)
# (rows, in_features, has bias, dtype) of a packed block -> most rows for which the packed kernel was
# checked to give F.linear's bits on this machine (0: never); probed once per shape and process
_EXACT_ROWS: dict[tuple, int] = {}


def can_prepack() -> bool:
    """True where this torch build has oneDNN weight prepacking (x86 / aarch64 CPU builds)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _probe_key(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    return tuple(weight.shape), bias is not None, weight.dtype


def _exact_rows(packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Most activation rows (up to _PACKED_MAX_ROWS) for which `packed` reproduces F.linear bit for bit
    on this machine, probed once per shape: kernels differ across CPUs, oneDNN versions and row counts
    (F.linear takes another path for a single row; at in_features 8960 it then rounds differently in
    about 1 call in 5), so each row count is tried on random inputs until ~24k outputs were compared."""
    key = _probe_key(weight, bias)
    if key not in _EXACT_ROWS:
        generator = torch.Generator().manual_seed(0)
        exact = 0
        for rows in _PROBE_ROWS:
            draws = max(1, min(16, 24576 // (rows * weight.shape[0])))  # ~24k outputs per row count
            x = torch.randn(draws, rows, weight.shape[1], generator=generator).to(weight.dtype)
            if not all(torch.equal(torch.ops.mkldnn._linear_pointwise(xi, packed, bias, "none", [], ""),
                                   F.linear(xi, weight, bias)) for xi in x):
                break
            exact = rows
        _EXACT_ROWS[key] = exact
    return _EXACT_ROWS[key]


def _identity(weight: torch.Tensor) -> tuple[int, int, torch.dtype]:
    return weight.data_ptr(), weight._version, weight.dtype


class Linear(nn.Linear):
    """y = x @ W.T + b, through a prepacked weight when one is current (see the module docstring)."""

    _packed: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
    _packed_from: tuple[int, int, torch.dtype] | None = None
    _packed_rows = 0  # the packed kernel runs for inputs of at most this many rows
    _evict: Callable[[torch.Tensor], object] | None = None  # drops .weight's pages after a many-row call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and self._packed_usable(x):
            if x.numel() // self.in_features <= self._packed_rows:
                return self._packed_forward(x)
            return self._dense_forward(x)
        return F.linear(x, self.weight, self.bias)

    def _packed_usable(self, x: torch.Tensor) -> bool:
        grad = torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)
        return (not grad and x.device.type == "cpu" and x.dtype == self.weight.dtype and x.numel() > 0
                and self._packed_from == _identity(self.weight))

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()  # (M, K)
        parts = [torch.ops.mkldnn._linear_pointwise(x2, w, b, "none", [], "") for w, b in self._packed]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (M, N)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows (prefill, the vision tower): F.linear on `.weight` itself, which a large GEMM
        re-lays out cheaply. A weight mmap'd from the checkpoint faults its pages back in from the page
        cache for the call and `evict` drops them again, so resident memory stays at the packed copy."""
        y = F.linear(x, self.weight, self.bias)
        if self._evict is not None:
            self._evict(self.weight)
        return y

    @torch.no_grad()
    def prepack(self, release: Callable[[torch.Tensor], object] | None = None,
                evict: Callable[[torch.Tensor], object] | None = None) -> bool:
        """Pack the current weight (CPU, bf16 only); `release(rows)` is called with each packed block
        of the source (to drop its mmap'd pages), `evict(weight)` after each many-row call that read
        the weight. Returns whether it packed (not when the packed kernel cannot reproduce F.linear's
        bits even for one row on this machine)."""
        weight = self.weight
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not can_prepack():
            return False
        bias = None if self.bias is None else self.bias.detach()
        packed, exact = [], _PACKED_MAX_ROWS
        for lo in range(0, self.out_features, _PACK_ROWS):
            rows, b = weight.detach()[lo:lo + _PACK_ROWS], None if bias is None else bias[lo:lo + _PACK_ROWS]
            if _EXACT_ROWS.get(_probe_key(rows, b)) == 0:  # already probed and refused: don't pack again
                return False
            packed.append((torch.ops.mkldnn._reorder_linear_weight(rows, _PACK_BATCH_HINT), b))
            exact = min(exact, _exact_rows(packed[-1][0], rows, b))
            if release is not None:
                release(rows)
        if exact == 0:  # the packed kernel does not match F.linear for one row here: stay unpacked
            return False
        self._packed, self._packed_from, self._packed_rows = packed, _identity(weight), exact
        self._evict = evict
        return True

    def unpack(self) -> None:
        """Drop the packed copy (forward falls back to F.linear)."""
        self._packed = self._packed_from = self._evict = None

    @property
    def is_packed(self) -> bool:
        return self._packed is not None and self._packed_from == _identity(self.weight)

    def __getstate__(self) -> dict:  # deepcopy / pickle: oneDNN's opaque tensors have no storage
        state = dict(self.__dict__)
        for name in ("_packed", "_packed_from", "_evict", "_packed_rows"):
            state.pop(name, None)  # the copy is unpacked: it runs F.linear
        return state

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): the packed copy would be stale
        self.unpack()
        return super()._apply(fn, recurse)

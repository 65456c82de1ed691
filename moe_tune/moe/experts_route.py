"""A layer's routed rows grouped by expert, padded and cut into pieces for the experts kernel's CPU loop.

T tokens with k experts each make S = T * k (token, slot) pairs. Grouped by expert, expert e gets
``counts[e]`` consecutive rows; under bf16 each expert's rows are zero-padded (``padded_rows``,
P rows in all) and run through its matmuls in pieces of at most ROW_PIECE rows, so that oneDNN
sees few row counts and reuses its compiled kernels (docs/speed.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NamedTuple

import torch

ROW_BLOCK = 64  # see padded_rows
# Under bf16 an expert's rows go through its matmuls in pieces of at most this many (a multiple
# of ROW_BLOCK), so that oneDNN compiles kernels for at most ROW_PIECE / ROW_BLOCK row counts
# however uneven the routing; it keeps every kernel it compiles (docs/speed.md).
ROW_PIECE = 512


def padded_rows(n: int, low_precision: bool) -> int:
    """The row count an expert's n tokens are zero-padded to. oneDNN's bf16 (AMX) matmuls compile
    a kernel per shape, and with a new token count per expert on every step that compile costs
    more than the matmul. Rounded up to a multiple of ROW_BLOCK, or below that to a power of two
    (generation's few tokens per expert would otherwise grow up to 64-fold), the shapes are few
    and stay cached. fp32 goes to MKL, which needs no padding."""
    if not low_precision:
        return n
    block = min(ROW_BLOCK, 1 << (n - 1).bit_length())
    return n + -n % block


class Piece(NamedTuple):
    """A run of one expert's rows through its matmuls: ``n`` real rows, then ``p - n`` zero pad rows."""

    expert: int
    n: int
    p: int
    start: int  # its first row among the S grouped rows
    padded_start: int  # its first row among the P padded rows
    first: bool  # the expert's first piece: it writes the weight's gradient, the others add to it

    @property
    def grouped(self) -> slice:
        """Its n real rows among the S grouped rows."""
        return slice(self.start, self.start + self.n)

    @property
    def padded(self) -> slice:
        """Its p rows among the P padded rows."""
        return slice(self.padded_start, self.padded_start + self.p)


class Route:
    """A layer's (token, slot) pairs grouped by expert, computed once for both projections and
    the backward. S = T * k grouped rows; expert e's rows are ``counts[e]`` consecutive ones,
    which the loop runs zero-padded to ``padded_rows`` rows: P rows in all."""

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, low_precision: bool):
        tokens, k = top_k_index.shape
        ids = top_k_index.reshape(-1)  # (S,)
        self.order = torch.argsort(ids, stable=True)  # (S,): (token, slot) pairs grouped by expert
        self.counts = torch.bincount(ids, minlength=num_experts).tolist()  # (E,): each expert's row count
        self.tokens = self.order // k  # (S,): the token of each grouped row
        rows = [padded_rows(n, low_precision) if n else 0 for n in self.counts]
        self.starts = [0, *itertools.accumulate(self.counts)][:-1]  # each expert's first grouped row
        self.padded_starts = [0, *itertools.accumulate(rows)][:-1]  # and first padded row
        # (P,): each expert's tokens, then its pad rows pointing at row T (the zero row that
        # the kernel (experts_kernel._ExpertsMLP) appends to the hidden states and their gradient), so one gather pads
        shift = torch.tensor([p - s for p, s in zip(self.padded_starts, self.starts)], device=ids.device)
        at = torch.arange(ids.numel(), device=ids.device) + shift.repeat_interleave(
            torch.tensor(self.counts, device=ids.device), output_size=ids.numel())
        self.padded_tokens = torch.full((sum(rows),), tokens, dtype=torch.long, device=ids.device)
        self.padded_tokens[at] = self.tokens
        self.rows = rows  # each expert's padded row count
        self.piece = ROW_PIECE if low_precision else max(rows, default=0)
        self.largest = min(max(rows, default=0), self.piece)  # the most rows one matmul runs on

    def pieces(self) -> Iterator[Piece]:
        """Every expert that received tokens, in pieces of at most ROW_PIECE padded rows under
        bf16 (see ROW_PIECE). Only the last piece of an expert has pad rows, and every piece has
        a real row."""
        for e, n in enumerate(self.counts):
            if not n:
                continue
            rows, s, ps = self.rows[e], self.starts[e], self.padded_starts[e]
            step = min(self.piece, rows)
            for j in range(0, rows, step):
                yield Piece(e, min(step, n - j), min(step, rows - j), s + j, ps + j, j == 0)

"""The request token table: which KV slot holds each position of each running request.

Every running request owns one row of `req_to_token`; entry [row, pos] is the KV pool slot
(see `mem_manager.MemoryManager`) holding the K/V of that request's token at position `pos`.
Attention reads K/V through this table, so the table lives on the model's device and is int32,
the index type the attention kernels load.

Rows are handed out as Python ints because each one is stored on its request object for the
request's whole life; the row free/used state is therefore kept on the host, where allocating and
freeing rows costs no device sync. Both are vectorised over the rows involved.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lightserve.backend.mem_manager import as_index_tensor


class ReqTableFull(RuntimeError):
    """More request rows were asked for than are free; the table is left unchanged."""

    def __init__(self, requested: int, free: int) -> None:
        super().__init__(f"request table full: asked for {requested} rows, {free} free")
        self.requested = requested
        self.free = free


class ReqManager:
    """Rows of the token table, one per running request."""

    def __init__(
        self, max_request_num: int, max_req_total_len: int, device: torch.device | str = "cpu"
    ) -> None:
        if max_request_num <= 0 or max_req_total_len <= 0:
            raise ValueError(
                f"request table needs positive sizes, got {max_request_num} x {max_req_total_len}"
            )
        self.max_request_num = max_request_num
        self.max_req_total_len = max_req_total_len
        self.device = torch.device(device)
        # Rows are not cleared on free: a request writes its positions before attention reads them.
        self.req_to_token = torch.zeros(
            max_request_num, max_req_total_len, dtype=torch.int32, device=self.device
        )
        self.req_state = torch.ones(max_request_num, dtype=torch.bool)  # host side, True = free
        self.can_use_req_size = max_request_num

    def alloc(self, n: int) -> list[int]:
        """Take the first `n` free rows. Raises ReqTableFull (table unchanged) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of rows ({n})")
        if n > self.can_use_req_size:
            raise ReqTableFull(n, self.can_use_req_size)
        rows = torch.nonzero(self.req_state).view(-1)[:n]
        self.req_state[rows] = False
        self.can_use_req_size -= n
        return rows.tolist()

    def free(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Return rows to the table.

        Raises ValueError, with the table unchanged, on out-of-range, repeated or free rows.
        """
        rows_t = as_index_tensor(rows, self.req_state.device)
        if rows_t.numel() == 0:
            return
        if bool(((rows_t < 0) | (rows_t >= self.max_request_num)).any()):
            raise ValueError(
                f"request rows out of range [0, {self.max_request_num}): {rows_t.tolist()}"
            )
        if torch.unique(rows_t).numel() != rows_t.numel():
            raise ValueError(f"request rows repeated in one free: {rows_t.tolist()}")
        already_free = self.req_state[rows_t]
        if bool(already_free.any()):
            raise ValueError(f"request rows already free: {rows_t[already_free].tolist()}")
        self.req_state[rows_t] = True
        self.can_use_req_size += rows_t.numel()

    def free_all(self) -> None:
        """Mark every row free."""
        self.req_state.fill_(True)
        self.can_use_req_size = self.max_request_num

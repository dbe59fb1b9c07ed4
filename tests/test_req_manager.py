"""The request token table against a plain Python model of its free rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lightserve.backend.req_manager import ReqManager, ReqTableFull

ROWS = 8
MAX_LEN = 16


class TableMachine(RuleBasedStateMachine):
    """Random row alloc/free sequences; after every step the table must equal the model."""

    def __init__(self) -> None:
        super().__init__()
        self.table = ReqManager(ROWS, MAX_LEN)
        self.free_rows: set[int] = set(range(ROWS))

    def _snapshot(self) -> tuple[torch.Tensor, int]:
        return self.table.req_state.clone(), self.table.can_use_req_size

    def _assert_unchanged(self, snapshot: tuple[torch.Tensor, int]) -> None:
        assert torch.equal(self.table.req_state, snapshot[0])
        assert self.table.can_use_req_size == snapshot[1]

    @property
    def held(self) -> list[int]:
        return sorted(set(range(ROWS)) - self.free_rows)

    @rule(n=st.integers(0, ROWS + 2))
    def alloc(self, n: int) -> None:
        if n > len(self.free_rows):
            snapshot = self._snapshot()
            message = rf"asked for {n} rows, {len(self.free_rows)} free"
            with pytest.raises(ReqTableFull, match=message):
                self.table.alloc(n)
            self._assert_unchanged(snapshot)
            return
        rows = self.table.alloc(n)
        assert isinstance(rows, list) and all(isinstance(r, int) for r in rows)
        assert rows == sorted(self.free_rows)[:n], "rows must be unique, free, lowest first"
        self.free_rows -= set(rows)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), as_tensor=st.booleans())
    def free(self, data: st.DataObject, as_tensor: bool) -> None:
        chosen = data.draw(st.lists(st.sampled_from(self.held), min_size=1, unique=True))
        self.table.free(torch.tensor(chosen, dtype=torch.int32) if as_tensor else chosen)
        self.free_rows |= set(chosen)

    @rule(data=st.data(), kind=st.sampled_from(["double", "out_of_range", "duplicate"]))
    def bad_free(self, data: st.DataObject, kind: str) -> None:
        valid = data.draw(st.lists(st.sampled_from(self.held), unique=True)) if self.held else []
        if kind == "double":
            if not self.free_rows:
                return
            bad = [data.draw(st.sampled_from(sorted(self.free_rows)))]
        elif kind == "out_of_range":
            bad = [data.draw(st.one_of(st.integers(ROWS, ROWS + 3), st.integers(-3, -1)))]
        else:
            if not valid:
                return
            bad = [valid[0]]
        rows = data.draw(st.permutations(valid + bad))
        snapshot = self._snapshot()
        with pytest.raises(ValueError):
            self.table.free(rows)
        self._assert_unchanged(snapshot)

    @rule()
    def free_all(self) -> None:
        self.table.free_all()
        self.free_rows = set(range(ROWS))

    @invariant()
    def matches_model(self) -> None:
        assert self.table.can_use_req_size == len(self.free_rows)
        assert {i for i, f in enumerate(self.table.req_state.tolist()) if f} == self.free_rows

    def teardown(self) -> None:
        self.table.free(self.held)
        assert self.table.can_use_req_size == ROWS


TableMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, derandomize=True, database=None
)
TestTableMachine = TableMachine.TestCase


def test_table_shape_dtype() -> None:
    table = ReqManager(ROWS, MAX_LEN)
    assert table.req_to_token.shape == (ROWS, MAX_LEN)
    assert table.req_to_token.dtype == torch.int32
    assert table.can_use_req_size == ROWS


def test_rows_index_the_table() -> None:
    """A row handed out is a usable index of req_to_token and keeps what was written to it."""
    table = ReqManager(ROWS, MAX_LEN)
    first, second = table.alloc(2)
    table.req_to_token[first, :3] = torch.tensor([7, 8, 9], dtype=torch.int32)
    table.req_to_token[second, :2] = torch.tensor([1, 2], dtype=torch.int32)
    assert table.req_to_token[first, :3].tolist() == [7, 8, 9]
    assert table.req_to_token[second, :2].tolist() == [1, 2]


def test_alloc_zero_negative_and_bad_sizes() -> None:
    table = ReqManager(ROWS, MAX_LEN)
    assert table.alloc(0) == []
    with pytest.raises(ValueError):
        table.alloc(-1)
    with pytest.raises(ValueError):
        ReqManager(0, MAX_LEN)
    with pytest.raises(TypeError):
        table.free(torch.tensor([0.0]))
    table.free([])
    assert table.can_use_req_size == ROWS

"""The TokenAttention KV pool against a plain Python model of its free slots."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lightserve.backend.mem_manager import KVCacheFull, MemoryManager

SIZE = 24  # small, so random alloc/free sequences fragment the pool and fill it up
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def first_window(free: set[int], n: int, size: int) -> int | None:
    """Start of the first run of `n` free slots in the model, or None."""
    for start in range(size - n + 1):
        if all(s in free for s in range(start, start + n)):
            return start
    return None


def small_pool(device: str = "cpu") -> MemoryManager:
    return MemoryManager(SIZE, torch.float16, head_num=2, head_dim=4, layer_num=3, device=device)


class PoolMachine(RuleBasedStateMachine):
    """Random alloc/free sequences; after every step the pool must equal the model exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = small_pool()
        self.free_slots: set[int] = set(range(SIZE))
        self.held: set[int] = set()

    def _snapshot(self) -> tuple[torch.Tensor, int]:
        return self.pool.mem_state.clone(), self.pool.can_use_mem_size

    def _assert_unchanged(self, snapshot: tuple[torch.Tensor, int]) -> None:
        assert torch.equal(self.pool.mem_state, snapshot[0])
        assert self.pool.can_use_mem_size == snapshot[1]

    def _take(self, got: torch.Tensor, n: int) -> None:
        assert got.dtype == torch.int64 and got.shape == (n,)
        assert got.device == self.pool.mem_state.device
        slots = got.tolist()
        assert len(set(slots)) == n, "a slot was handed out twice in one alloc"
        assert set(slots) <= self.free_slots, "a slot in use was handed out again"
        self.free_slots -= set(slots)
        self.held |= set(slots)

    @rule(n=st.integers(0, SIZE + 2))
    def alloc(self, n: int) -> None:
        if n > len(self.free_slots):
            snapshot = self._snapshot()
            with pytest.raises(KVCacheFull):
                self.pool.alloc(n)
            self._assert_unchanged(snapshot)
            return
        window = first_window(self.free_slots, n, SIZE)
        got = self.pool.alloc(n)
        if window is not None:
            assert got.tolist() == list(range(window, window + n)), "a free window was skipped"
        else:
            assert got.tolist() == sorted(self.free_slots)[:n]
        self._take(got, n)

    @rule(n=st.integers(0, SIZE + 2))
    def alloc_contiguous(self, n: int) -> None:
        window = first_window(self.free_slots, n, SIZE) if n <= len(self.free_slots) else None
        snapshot = self._snapshot()
        got = self.pool.alloc_contiguous(n)
        if window is None:
            assert got is None
            self._assert_unchanged(snapshot)
            return
        assert got is not None
        idx, start, end = got
        assert (start, end) == (window, window + n)
        assert idx.tolist() == list(range(start, end))
        self._take(idx, n)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), as_tensor=st.booleans())
    def free(self, data: st.DataObject, as_tensor: bool) -> None:
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.held)), min_size=1, unique=True))
        # Token-table rows are int32, so the pool must accept them as they are.
        self.pool.free(torch.tensor(chosen, dtype=torch.int32) if as_tensor else chosen)
        self.held -= set(chosen)
        self.free_slots |= set(chosen)

    @rule(data=st.data(), kind=st.sampled_from(["double", "out_of_range", "duplicate"]))
    def bad_free(self, data: st.DataObject, kind: str) -> None:
        # Valid slots mixed into the bad call must not be freed either.
        held = sorted(self.held)
        valid = data.draw(st.lists(st.sampled_from(held), unique=True)) if held else []
        if kind == "double":
            if not self.free_slots:
                return
            bad = [data.draw(st.sampled_from(sorted(self.free_slots)))]
        elif kind == "out_of_range":
            bad = [data.draw(st.one_of(st.integers(SIZE, SIZE + 5), st.integers(-5, -1)))]
        else:
            if not valid:
                return
            bad = [valid[0]]
        idx = data.draw(st.permutations(valid + bad))
        snapshot = self._snapshot()
        with pytest.raises(ValueError):
            self.pool.free(idx)
        self._assert_unchanged(snapshot)

    @rule()
    def free_all(self) -> None:
        self.pool.free_all()
        self.free_slots |= self.held
        self.held.clear()

    @invariant()
    def matches_model(self) -> None:
        assert self.pool.can_use_mem_size == len(self.free_slots)
        expected = torch.zeros(SIZE, dtype=torch.bool)
        expected[sorted(self.free_slots)] = True
        assert torch.equal(self.pool.mem_state.cpu(), expected)

    def teardown(self) -> None:
        if self.held:
            self.pool.free(sorted(self.held))
        assert self.pool.can_use_mem_size == SIZE
        assert bool(self.pool.mem_state.all())


PoolMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolMachine = PoolMachine.TestCase


@pytest.mark.parametrize("device", DEVICES)
def test_buffers_shape_dtype_device(device: str) -> None:
    pool = small_pool(device)
    buffers = [t for layer in pool.layers for t in (layer.k, layer.v)]
    assert len(pool.layers) == 3 and not any(layer.quantized for layer in pool.layers)
    for buf in buffers:
        assert buf.shape == (SIZE, 2, 4)
        assert buf.dtype == torch.float16
        assert buf.device.type == device
        assert not bool(buf.isnan().any())
    assert pool.mem_state.dtype == torch.bool and pool.mem_state.device.type == device
    # Every layer and K/V own separate storage: writing one must not show up in another.
    buffers[0][5].fill_(1.0)
    assert all(float(b.abs().sum()) == 0.0 for b in buffers[1:])


@pytest.mark.parametrize("kv_dtype", [None, torch.int8])
def test_bytes_per_token_matches_buffers(kv_dtype) -> None:
    pool = MemoryManager(SIZE, torch.float16, 2, 4, 3, kv_dtype=kv_dtype)
    buffers = [t for layer in pool.layers for t in (layer.k, layer.v, layer.k_scale, layer.v_scale) if t is not None]
    total = sum(b.numel() * b.element_size() for b in buffers)
    assert MemoryManager.bytes_per_token(pool.kv_dtype, 2, 4, 3) * SIZE == total
    assert MemoryManager.bytes_per_token(torch.float32, 3, 64, 30) == 2 * 30 * 3 * 64 * 4
    # SmolLM2's rows: an int8 pool holds 128 / 68 = 1.88x the tokens of a bf16 one in the same bytes.
    assert MemoryManager.bytes_per_token(torch.int8, 3, 64, 30) == 2 * 30 * 3 * (64 + 4)


def test_int8_pool_layers_carry_scales() -> None:
    pool = MemoryManager(SIZE, torch.bfloat16, 2, 4, 3, kv_dtype=torch.int8)
    for layer in pool.layers:
        assert layer.quantized and layer.k.dtype == layer.v.dtype == torch.int8
        assert layer.k_scale.shape == layer.v_scale.shape == (SIZE, 2) and layer.k_scale.dtype == torch.float32


def test_alloc_zero_and_negative() -> None:
    pool = small_pool()
    empty = pool.alloc(0)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    with pytest.raises(ValueError):
        pool.alloc(-1)
    with pytest.raises(ValueError):
        pool.alloc_contiguous(-1)
    pool.free([])
    assert pool.can_use_mem_size == SIZE


def test_kv_cache_full_message() -> None:
    pool = small_pool()
    pool.alloc(20)
    with pytest.raises(KVCacheFull, match=r"asked for 5 slots, 4 free") as err:
        pool.alloc(5)
    assert (err.value.requested, err.value.free) == (5, 4)
    assert isinstance(err.value, RuntimeError)


@pytest.mark.parametrize("idx", [torch.tensor([True, False]), torch.tensor([0.0, 1.0]), [True]])
def test_free_refuses_non_integer_indices(idx: object) -> None:
    pool = small_pool()
    pool.alloc(4)
    with pytest.raises(TypeError):
        pool.free(idx)
    assert pool.can_use_mem_size == SIZE - 4


def test_free_accepts_2d_table_slice() -> None:
    pool = small_pool()
    slots = pool.alloc(6)
    pool.free(slots.to(torch.int32).view(2, 3))
    assert pool.can_use_mem_size == SIZE


@pytest.mark.parametrize("device", DEVICES)
def test_large_pool_first_fit_and_fallback(device: str) -> None:
    """A pool big enough that the scans run in parallel chunks still returns the first window."""
    torch.manual_seed(0)
    size = 200_000
    pool = MemoryManager(size, torch.float16, head_num=1, head_dim=1, layer_num=1, device=device)
    pool.alloc(size)
    # Free a random scatter (a run of 64 in it has probability ~0.3**64) plus two windows of
    # 64 kept apart from it by used slots; the earlier window must be picked.
    scattered = torch.nonzero(torch.rand(size) < 0.3).view(-1)
    scattered = scattered[(scattered < 140_000) | (scattered >= 190_000)]
    windows = torch.cat([torch.arange(150_000, 150_064), torch.arange(180_000, 180_064)])
    pool.free(torch.cat([scattered, windows]))
    free_now = pool.mem_state.cpu().clone()
    got = pool.alloc(64)
    assert got.tolist() == list(range(150_000, 150_064))
    # No window of 70 exists any more: the first 70 free slots are taken instead.
    expected = torch.nonzero(pool.mem_state.cpu()).view(-1)[:70]
    assert pool.alloc_contiguous(70) is None
    assert torch.equal(pool.alloc(70).cpu(), expected)
    assert pool.can_use_mem_size == int(free_now.sum()) - 134

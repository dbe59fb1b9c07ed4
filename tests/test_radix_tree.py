"""The prefix cache's radix tree: unit tests, and property tests against a reference model."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightserve.prefix_cache import Node, RadixTree


T = TypeVar("T")


def flat(pieces: list) -> list[int]:
    return [int(x) for x in itertools.chain.from_iterable(pieces)]


def slots(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def counts(tree: RadixTree) -> tuple[int, int, int]:
    return tree.total_tokens, tree.evictable_tokens, tree.protected_tokens


# ---------------------------------------------------------------------------------------------------
# Unit tests


def test_insert_returns_the_cached_length_and_takes_only_the_suffix():
    tree = RadixTree()
    assert tree.insert([1, 2, 3], [10, 11, 12]) == 0
    assert tree.insert([1, 2, 3, 4, 5], [20, 21, 22, 23, 24]) == 3
    assert tree.insert([1, 2], [30, 31]) == 2
    assert tree.insert([], []) == 0
    assert counts(tree) == (5, 5, 0)
    # Positions 0-2 keep the first insert's slots; only 23 and 24 of the second were taken.
    assert flat(tree.match_prefix([1, 2, 3, 4, 5]).values) == [10, 11, 12, 23, 24]


def test_insert_rejects_a_value_of_the_wrong_length():
    with pytest.raises(ValueError):
        RadixTree().insert([1, 2, 3], [10, 11])


def test_split_keeps_values_aligned_with_keys():
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], [10, 11, 12, 13])
    assert tree.insert([1, 2, 9], [20, 21, 22]) == 2
    (top,) = tree.root.children.values()
    assert top.key == (1, 2) and list(top.value) == [10, 11]
    assert sorted(child.key for child in top.children.values()) == [(3, 4), (9,)]
    assert tree.match_prefix([1, 2, 3, 4]).values == [[10, 11], [12, 13]]
    assert tree.match_prefix([1, 2, 9, 9]).values == [[10, 11], [22]]
    assert counts(tree) == (5, 5, 0)


def test_match_mid_edge_splits_so_the_handle_covers_exactly_the_match():
    tree = RadixTree()
    tree.insert([1, 2, 3, 4, 5, 6], slots(10, 6))
    match = tree.match_prefix([1, 2, 3, 7])
    assert match.length == 3 and flat(match.values) == [10, 11, 12]
    assert match.node.key == (1, 2, 3)
    tree.inc_ref(match.node)
    assert counts(tree) == (6, 3, 3)
    # Only the unmatched rest of the edge can go.
    assert flat(tree.evict(100)) == [13, 14, 15]
    assert counts(tree) == (3, 0, 3)
    tree.dec_ref(match.node)
    assert counts(tree) == (3, 3, 0)


def test_match_of_a_whole_key_and_of_nothing():
    tree = RadixTree()
    tree.insert([1, 2, 3], slots(10, 3))
    whole = tree.match_prefix([1, 2, 3])
    assert whole.length == 3 and whole.node.key == (1, 2, 3)
    for key in ([], [7, 1, 2]):
        miss = tree.match_prefix(key)
        assert miss.length == 0 and miss.values == [] and miss.node is tree.root
        # Locking the root is allowed and protects nothing.
        tree.inc_ref(miss.node)
        assert counts(tree) == (3, 3, 0)
        tree.dec_ref(miss.node)


def test_match_len_leaves_the_tree_untouched():
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], slots(10, 4))
    tree.insert([5, 6], slots(20, 2))
    assert tree.match_len([1, 2, 9]) == 2
    assert tree.match_len([1, 2, 3, 4, 5]) == 4
    assert tree.match_len([8]) == 0
    # No split, and [1, 2, 3, 4] is still the least recently used.
    assert sorted(child.key for child in tree.root.children.values()) == [(1, 2, 3, 4), (5, 6)]
    assert flat(tree.evict(1)) == [10, 11, 12, 13]


def test_references_block_eviction_of_the_node_and_its_ancestors():
    tree = RadixTree()
    tree.insert([1, 2, 3], slots(10, 3))
    tree.insert([1, 2, 4], slots(20, 3))
    tree.insert([5], [30])
    handle = tree.match_prefix([1, 2, 3]).node
    tree.inc_ref(handle)
    tree.inc_ref(handle)
    assert counts(tree) == (5, 2, 3)
    assert sorted(flat(tree.evict(100))) == [22, 30]
    assert counts(tree) == (3, 0, 3)
    tree.dec_ref(handle)
    assert tree.evict(100) == [] and counts(tree) == (3, 0, 3)
    tree.dec_ref(handle)
    assert counts(tree) == (3, 3, 0)
    assert flat(tree.evict(100)) == [12, 10, 11]
    assert counts(tree) == (0, 0, 0) and not tree.root.children


def test_a_lock_stays_valid_across_later_splits():
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], slots(10, 4))
    handle = tree.match_prefix([1, 2, 3, 4]).node
    tree.inc_ref(handle)
    assert tree.insert([1, 2, 5], slots(20, 3)) == 2
    assert tree.match_prefix([1, 9]).length == 1
    assert counts(tree) == (5, 1, 4)
    tree.dec_ref(handle)
    assert counts(tree) == (5, 5, 0)


def test_unlocking_without_a_lock_or_locking_an_evicted_node_raises():
    tree = RadixTree()
    tree.insert([1, 2], [10, 11])
    handle = tree.match_prefix([1, 2]).node
    with pytest.raises(ValueError):
        tree.dec_ref(handle)
    # An evicted handle fails the same way instead of corrupting the counts, and cannot be locked.
    tree.evict(2)
    with pytest.raises(ValueError):
        tree.dec_ref(handle)
    with pytest.raises(ValueError):
        tree.inc_ref(handle)
    assert counts(tree) == (0, 0, 0)


def test_eviction_is_least_recently_used_first_and_parents_follow_their_children():
    tree = RadixTree()
    tree.insert([1, 2, 3], [10, 11, 12])
    tree.insert([1, 2, 4], [10, 11, 13])
    tree.insert([9], [19])
    tree.insert([8], [18])
    tree.match_prefix([9])
    # Oldest first: [3], then [4] (which made [1, 2] as recent as itself), then [1, 2], [8], [9].
    assert [flat(tree.evict(1)) for _ in range(6)] == [[12], [13], [10, 11], [18], [19], []]


def test_a_parent_used_after_its_children_is_evicted_by_its_own_time():
    tree = RadixTree()
    tree.insert([1, 2, 3], [10, 11, 12])
    tree.insert([5], [15])
    tree.match_prefix([1, 2])  # splits [1, 2, 3] and makes [1, 2] newer than [5]
    assert flat(tree.evict(2)) == [12, 15]


def test_evict_frees_at_least_what_is_asked_in_whole_nodes():
    tree = RadixTree()
    tree.insert([1, 2, 3], slots(10, 3))
    tree.insert([4, 5, 6], slots(20, 3))
    assert flat(tree.evict(2)) == [10, 11, 12]
    assert flat(tree.evict(4)) == [20, 21, 22]
    assert tree.evict(4) == []


def test_a_caller_clock_orders_eviction_and_ties_go_to_the_older_node():
    tree = RadixTree()
    tree.insert([1], [10], now=5)
    tree.insert([2], [20], now=5)
    tree.insert([3], [30], now=3)  # the clock never goes back: this counts as time 5 too
    tree.match_prefix([1], now=9)
    assert [flat(tree.evict(1)) for _ in range(3)] == [[20], [30], [10]]


def test_a_parent_that_frees_up_ties_by_creation_order_too():
    tree = RadixTree()
    tree.insert([1, 2], [10, 11], now=1)
    tree.insert([5], [15], now=1)
    tree.match_prefix([1], now=1)  # the split creates [1] after [5]; [1, 2]'s node keeps [2]
    # Within one call: [2] goes, [1] becomes a leaf, and [5], created before it, goes next.
    assert [list(value) for value in tree.evict(2)] == [[11], [15]]


def test_flush_drops_everything_unreferenced():
    tree = RadixTree()
    tree.insert([1, 2, 3], slots(10, 3))
    tree.insert([1, 2, 4], slots(20, 3))
    tree.insert([5, 6], slots(30, 2))
    handle = tree.match_prefix([1, 2, 3]).node
    tree.inc_ref(handle)
    assert sorted(flat(tree.flush())) == [22, 30, 31]
    assert counts(tree) == (3, 0, 3)
    tree.dec_ref(handle)
    assert sorted(flat(tree.flush())) == [10, 11, 12]
    assert counts(tree) == (0, 0, 0) and tree.flush() == []


def test_numpy_and_range_values_are_sliced_not_inspected():
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], np.arange(100, 104, dtype=np.int64))
    tree.insert([1, 2, 7], np.arange(200, 203, dtype=np.int64))
    pieces = tree.match_prefix([1, 2, 3, 4]).values
    assert all(isinstance(piece, np.ndarray) for piece in pieces)
    assert np.concatenate(pieces).tolist() == [100, 101, 102, 103]
    router = RadixTree()
    router.insert([1, 2, 3, 4], range(4))
    assert router.match_prefix([1, 2, 9]).values == [range(0, 2)]


def test_image_positions_keyed_by_md5_never_share_kv():
    image_token = 32000
    prompt = [1, 2, image_token, image_token, 5]
    tree = RadixTree()
    tree.insert([(t, "md5-a") if t == image_token else t for t in prompt], slots(10, 5))
    other_image = [(t, "md5-b") if t == image_token else t for t in prompt]
    assert tree.match_prefix(other_image).length == 2
    assert tree.insert(other_image, slots(20, 5)) == 2


def test_the_module_imports_neither_torch_nor_numpy():
    code = (
        "import sys, lightserve.prefix_cache; "
        "print(sorted({'torch', 'numpy', 'transformers'} & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# Runs random operations, with a coarse caller clock so that many nodes tie on time, and prints every
# decision. Keys hold strings, whose hashes (and so dict layouts) change with PYTHONHASHSEED; and
# Node-sized memory blocks are first freed in an order set by the argument, so that node ids do not
# follow creation order.
_DECISIONS_SCRIPT = """
import random, sys
from lightserve.prefix_cache import Node, RadixTree
spare = [Node((), range(0), None, 0, 0) for _ in range(2000)]
random.Random(int(sys.argv[1])).shuffle(spare)
del spare
rng = random.Random(1)
tree, slot, locked, out = RadixTree(), 0, [], []
for step in range(400):
    now = step // 8
    key = [rng.choice(["a", "b", ("img", "x"), ("img", "y")]) for _ in range(rng.randrange(1, 8))]
    op = rng.randrange(5)
    if op <= 1:
        out.append(tree.insert(key, range(slot, slot + len(key)), now))
        slot += len(key)
    elif op == 2:
        match = tree.match_prefix(key, now)
        tree.inc_ref(match.node)
        locked.append(match.node)
        out.append([list(v) for v in match.values])
    elif op == 3 and locked:
        tree.dec_ref(locked.pop(rng.randrange(len(locked))))
    else:
        out.append([list(v) for v in tree.evict(rng.randrange(1, 6))])
print(out)
"""


def test_decisions_do_not_depend_on_hashes_or_memory_layout():
    runs = [
        subprocess.run(
            [sys.executable, "-c", _DECISIONS_SCRIPT, seed],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1] and len(runs[0]) > 100


# ---------------------------------------------------------------------------------------------------
# Property tests: random operation sequences, checked against a reference model


@dataclass
class Request:
    key: tuple  # the prefix it matched and locked: the tree's slots
    handles: list[Node]  # one per tree
    own_key: tuple  # the rest of its prompt, then its output: tokens whose KV it computed itself
    own: list[int]  # their slots, which it owns until it finishes


class Harness:
    """Feeds the same operations to two trees and checks them against a reference model.

    The model maps every cached prefix (a tuple) to the slot of its last position and to the logical
    time it was last used. Slots are unique ints, each owned by the tree, by one request or by the
    caller's pool (`free`). With
    `ops_per_step`, the trees get a caller clock (`now`) that several operations share, so that many
    nodes tie on time and the tie-break must agree between the trees too.
    """

    def __init__(self, ops_per_step: int | None) -> None:
        self.trees = [RadixTree(), RadixTree()]
        self.cached: dict[tuple, int] = {}
        self.used_at: dict[tuple, int] = {}
        self.ops = 0
        self.ops_per_step = ops_per_step
        self.requests: list[Request] = []
        self.free: set[int] = set()
        self.next_slot = 0

    def fresh(self, n: int) -> list[int]:
        self.next_slot += n
        return slots(self.next_slot - n, n)

    def give_back(self, slot_list: list[int]) -> None:
        for slot in slot_list:
            assert slot not in self.free, "a slot was freed twice"
            self.free.add(slot)

    def model_match(self, key: tuple) -> int:
        length = 0
        while length < len(key) and key[: length + 1] in self.cached:
            length += 1
        return length

    def tick(self) -> tuple[int, int | None]:
        """The time of the next match or insert: as the trees will record it, and the `now` they get."""
        self.ops += 1
        if self.ops_per_step is None:
            return self.ops, None  # the trees tick once per operation, as the model does
        return self.ops // self.ops_per_step, self.ops // self.ops_per_step

    def touch(self, key: tuple, length: int, time: int) -> None:
        for i in range(1, length + 1):
            self.used_at[key[:i]] = time

    def protected(self) -> set[tuple]:
        return {r.key[:i] for r in self.requests for i in range(1, len(r.key) + 1)}

    def same(self, results: list[T]) -> T:
        assert results[0] == results[1], "two trees fed the same operations disagree"
        return results[0]

    # Operations -----------------------------------------------------------------------------------

    def insert(self, key: tuple) -> None:
        """A request that matched nothing finishes: all its slots are its own."""
        value = self.fresh(len(key))
        self.cache(key, value, already_shared=0)

    def lock(self, key: tuple) -> None:
        expected = self.model_match(key)
        time, now = self.tick()
        matches = [tree.match_prefix(key, now) for tree in self.trees]
        length = self.same([m.length for m in matches])
        assert length == expected
        expected_slots = [self.cached[key[: i + 1]] for i in range(length)]
        assert self.same([flat(m.values) for m in matches]) == expected_slots
        self.touch(key, length, time)
        for tree, match in zip(self.trees, matches):
            tree.inc_ref(match.node)
        # It computes the rest of its prompt into slots of its own.
        own = self.fresh(len(key) - length)
        self.requests.append(Request(key[:length], [m.node for m in matches], key[length:], own))

    def finish(self, index: int, extra: tuple) -> None:
        """A locked request generates `extra` and finishes: it inserts the tree's slots and then its own."""
        if not self.requests:
            return
        request = self.requests.pop(index % len(self.requests))
        shared = [self.cached[request.key[: i + 1]] for i in range(len(request.key))]
        key, value = request.key + request.own_key + extra, shared + request.own + self.fresh(len(extra))
        self.cache(key, value, already_shared=len(shared))
        for tree, handle in zip(self.trees, request.handles):
            tree.dec_ref(handle)

    def abort(self, index: int) -> None:
        if self.requests:
            request = self.requests.pop(index % len(self.requests))
            self.give_back(request.own)
            for tree, handle in zip(self.trees, request.handles):
                tree.dec_ref(handle)

    def probe(self, key: tuple) -> None:
        assert self.same([tree.match_len(key) for tree in self.trees]) == self.model_match(key)

    def evict(self, n_tokens: int) -> None:
        evictable = self.trees[0].evictable_tokens
        evicted = self.same([[flat([v]) for v in tree.evict(n_tokens)] for tree in self.trees])
        freed = sum(map(len, evicted))
        assert freed >= min(n_tokens, evictable)
        if evicted:
            assert freed - len(evicted[-1]) < n_tokens, "evicted more nodes than needed"
        self.drop(list(itertools.chain.from_iterable(evicted)), lru=True)

    def flush(self) -> None:
        dropped = self.same([flat(tree.flush()) for tree in self.trees])
        self.drop(dropped, lru=False)
        assert set(self.cached) == self.protected()

    # Model updates ----------------------------------------------------------------------------------

    def cache(self, key: tuple, value: list[int], already_shared: int) -> None:
        expected = self.model_match(key)
        time, now = self.tick()
        cached = self.same([tree.insert(key, value, now) for tree in self.trees])
        assert cached == expected and cached >= already_shared
        # The caller frees its own duplicates; the tree now owns the rest.
        self.give_back(value[already_shared:cached])
        for i in range(cached, len(key)):
            self.cached[key[: i + 1]] = value[i]
        self.touch(key, len(key), time)

    def drop(self, dropped: list[int], lru: bool) -> None:
        owner = {slot: prefix for prefix, slot in self.cached.items()}
        assert all(slot in owner for slot in dropped), "the tree returned a slot it did not own"
        prefixes = [owner[slot] for slot in dropped]
        assert not self.protected() & set(prefixes), "a referenced prefix was dropped"
        for prefix in prefixes:
            del self.cached[prefix]
        if lru and prefixes:
            newest = max(self.used_at[p] for p in prefixes)
            assert all(self.used_at[p] >= newest for p in self.cached.keys() - self.protected()), "not LRU"
        self.give_back(dropped)

    # Invariants -----------------------------------------------------------------------------------

    def check(self) -> None:
        protected = self.protected()
        for i, tree in enumerate(self.trees):
            assert counts(tree) == (len(self.cached), len(self.cached) - len(protected), len(protected))
            assert self.walk(tree) == self.cached
            # Handles stay valid across splits: each still ends exactly at its request's prefix.
            assert all(path(tree, r.handles[i]) == r.key for r in self.requests)
        owned = [*self.free, *self.cached.values(), *(slot for r in self.requests for slot in r.own)]
        assert sorted(owned) == list(range(self.next_slot)), "a slot is owned twice, or by no one"

    def walk(self, tree: RadixTree) -> dict[tuple, int]:
        """The tree's prefix -> slot map, checking each node's structure, count and time on the way."""
        found: dict[tuple, int] = {}
        stack = [(tree.root, ())]
        while stack:
            node, prefix = stack.pop()
            for first, child in node.children.items():
                assert child.parent is node and child.key and child.key[0] == first
                assert len(child.value) == len(child.key)
                full = prefix + child.key
                assert child.ref_count == sum(r.key[: len(full)] == full for r in self.requests)
                for i, slot in enumerate(flat([child.value])):
                    entry = full[: len(prefix) + i + 1]
                    found[entry] = slot
                    assert self.used_at[entry] == child.last_access
                stack.append((child, full))
        return found

    def finish_everything(self) -> None:
        """Unlock every request and flush: every slot ever handed out must be back with the caller."""
        while self.requests:
            self.abort(0)
        self.flush()
        assert all(counts(tree) == (0, 0, 0) and not tree.root.children for tree in self.trees)
        assert self.free == set(range(self.next_slot))


def path(tree: RadixTree, node: Node) -> tuple:
    parts = []
    while node is not tree.root:
        parts.append(node.key)
        node = node.parent
    return tuple(itertools.chain.from_iterable(reversed(parts)))


# Weighted by repetition: the tree must grow between evictions for them to free only part of it, and
# a flush empties it, so it comes rarely.
KINDS = ["insert"] * 3 + ["lock"] * 2 + ["finish"] * 2 + ["evict"] * 2 + ["abort", "probe", "flush"]


def scenarios(element: st.SearchStrategy) -> st.SearchStrategy:
    """A few base keys, and operations whose keys are a base cut short plus a tail: prefixes overlap a lot.

    Each operation is (kind, number, cut, tail); `number` picks the base, the request, or the tokens to evict.
    """
    bases = st.lists(st.lists(element, min_size=1, max_size=12).map(tuple), min_size=1, max_size=4)
    tail = st.lists(element, max_size=4).map(tuple)
    op = st.tuples(st.sampled_from(KINDS), st.integers(0, 7), st.integers(0, 12), tail)
    return st.tuples(bases, st.lists(op, min_size=10, max_size=50))


def run(scenario: tuple, ops_per_step: int | None = None) -> None:
    bases, ops = scenario
    harness = Harness(ops_per_step)
    for kind, number, cut, tail in ops:
        if kind in ("insert", "lock", "probe"):
            getattr(harness, kind)(bases[number % len(bases)][:cut] + tail)
        elif kind == "finish":
            harness.finish(number, tail)
        elif kind == "abort":
            harness.abort(number)
        elif kind == "evict":
            harness.evict(number)
        else:
            harness.flush()
        harness.check()
    harness.finish_everything()


@settings(max_examples=150, deadline=None)
@given(scenarios(st.integers(0, 2)))
def test_random_operations_small_alphabet(scenario):
    run(scenario)


# Text tokens, and image positions keyed by (image token, image md5).
IMAGE_KEY_ELEMENT = st.one_of(
    st.integers(0, 9), st.tuples(st.just(32000), st.sampled_from(["md5-a", "md5-b"]))
)


@settings(max_examples=60, deadline=None)
@given(scenarios(IMAGE_KEY_ELEMENT))
def test_random_operations_with_image_keys_and_a_caller_clock(scenario):
    run(scenario, ops_per_step=3)

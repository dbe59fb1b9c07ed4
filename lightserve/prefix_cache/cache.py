"""The prefix cache as the router and every backend rank run it: one class, the same calls.

A rank's tree maps prefixes to its KV slot indices; the router's tree is the same tree with
`range` values (it never sees slots). Both receive the same operations in the same order, in the
order of one step (`ModelEngine.step` / `Scheduler.schedule` and `Scheduler._account`):

1. `flush`, when the step carries one;
2. `release` of the requests the step releases, in `StepPlan.release` order;
3. `lock` of each new request, in `StepPlan.new_reqs` order, to the length the router chose;
4. `evict` of `StepPlan.evict` tokens, before the step's slots are allocated;
5. `commit` of each chunk's request, in `StepPlan.chunks` order, once the chunk is computed;
6. `release` of each request that finishes, in output order; `unlock` of each refused request.

Since the trees are deterministic (see `radix_tree`), every tree then makes the same choices: the
router knows how long each hit is and how much to evict without asking, and the ranks of a
tensor-parallel group stay identical. A rank checks that each lock gets the length the router
chose, so a diverged tree fails a step loudly instead of computing from wrong slots.

Slot ownership. A request's tokens [0, hold.length) are the tree's, locked by the request's hold;
its tokens [hold.length, computed) are its own. `commit` hands a request's computed tokens to the
tree (after each prompt chunk, so that a request admitted while another is still computing the
same prefix can use it), and `release` hands over the rest when it leaves. Where another request
cached the same tokens first, the tree keeps its own slots and the caller frees the duplicates.

Disabled, the class keeps no tree: `lock` finds nothing, `commit` changes nothing, and `release`
gives every slot back to the caller, so callers need no second code path.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, Optional, TypeVar

from lightserve.io_struct import GenerateReq, ImageItem
from lightserve.prefix_cache.radix_tree import Node, RadixTree, Slots

S = TypeVar("S", bound=Slots)


def cache_key(prompt_ids: Sequence[int], images: Sequence[ImageItem], output_ids: Sequence[int] = ()) -> list[Hashable]:
    """The key of a request's tokens: its ids, with each image position keyed by the image's md5.

    Image placeholder tokens are the same id for every image; keying those positions by the
    image's content keeps two different images from ever sharing KV.
    """
    key: list[Hashable] = list(prompt_ids)
    for image in images:
        key[image.token_start : image.token_start + image.token_num] = [image.md5] * image.token_num
    key.extend(output_ids)
    return key


def request_key(req: GenerateReq) -> list[Hashable]:
    """The key of everything a new (or resumed) request computes: its prompt, then the output it
    had generated before a pause."""
    return cache_key(req.prompt_ids, req.images, req.output_ids)


def hit_limit(req: GenerateReq) -> int:
    """How many of a new (or resumed) request's first tokens a cache hit may cover.

    All but the last: a request always computes at least one token, whose logits sample its next
    one. None of them when the request scores its prompt (`GenerateReq.scores_prompt`): every prompt
    position needs its logits, which a hit would skip (vLLM does the same); its computed KV still
    goes to the cache.
    """
    if req.scores_prompt:
        return 0
    return len(req.prompt_ids) + len(req.output_ids) - 1


@dataclass(frozen=True)
class Hold:
    """A request's lock on its first `length` tokens in the tree (`node` ends exactly there)."""

    length: int = 0
    node: Optional[Node] = None


NO_HOLD = Hold()


@dataclass(frozen=True)
class Commit(Generic[S]):
    """What `commit` did: the request's new hold, and the positions [start, end) whose slots the
    tree already had. The caller points those positions at `tree_slots` (the tree's copies) and
    frees `duplicates` (its own)."""

    hold: Hold
    start: int
    end: int
    tree_slots: Optional[S]
    duplicates: Optional[S]


class PrefixCache(Generic[S]):
    """The radix tree plus the request-level operations (see the module docstring)."""

    def __init__(self, enabled: bool, concat) -> None:
        """`concat(pieces) -> S` joins the per-edge values of a match (torch.cat on a rank)."""
        self.enabled = enabled
        self._concat = concat
        self.tree = RadixTree()

    # ---- figures -------------------------------------------------------------------------------
    @property
    def total_tokens(self) -> int:
        return self.tree.total_tokens

    @property
    def evictable_tokens(self) -> int:
        return self.tree.evictable_tokens

    @property
    def protected_tokens(self) -> int:
        return self.tree.protected_tokens

    def probe(self, key: Sequence[Hashable], limit: int) -> tuple[int, int]:
        """Read-only: (how many of `key[:limit]` a `lock` would hit, how many of those fewer than
        two locks protect now: see `RadixTree.probe`)."""
        if not self.enabled or limit <= 0:
            return 0, 0
        return self.tree.probe(key[:limit])

    def probe_request(self, req: GenerateReq) -> tuple[int, int]:
        """`probe` for a waiting request, as `lock_request` would lock it."""
        return self.probe(request_key(req), hit_limit(req))

    # ---- request operations ----------------------------------------------------------------------
    def lock_request(self, req: GenerateReq) -> tuple[Hold, Optional[S]]:
        """`lock` a new request's longest cached prefix within `hit_limit`."""
        return self.lock(request_key(req), hit_limit(req))

    def lock(self, key: Sequence[Hashable], limit: int) -> tuple[Hold, Optional[S]]:
        """Match `key[:limit]`, lock the match, and return the hold with the matched slots."""
        if not self.enabled or limit <= 0:
            return NO_HOLD, None
        match = self.tree.match_prefix(key[:limit])
        self.tree.inc_ref(match.node)
        return Hold(match.length, match.node), (self._concat(match.values) if match.length else None)

    def sole_tokens(self, hold: Hold) -> int:
        """The tokens of `hold` that no other lock protects (evictable once it is unlocked)."""
        return self.tree.sole_locked_len(hold.node) if hold.node is not None else 0

    def unlock(self, hold: Hold) -> None:
        if hold.node is not None:
            self.tree.dec_ref(hold.node)

    def commit(self, key: Sequence[Hashable], slots: S, hold: Hold) -> Commit[S]:
        """Hand the request's tokens `key` (its slots `slots`, all computed) to the tree; the
        request's hold moves to the end of `key`. The tree keeps its slice of `slots`, so pass a
        copy, never a view of a table row."""
        if not self.enabled or len(key) <= hold.length:
            return Commit(hold, 0, 0, None, None)
        cached = self.tree.insert(key, slots)
        match = self.tree.match_prefix(key)
        self.tree.inc_ref(match.node)
        self.unlock(hold)
        start, end = hold.length, max(cached, hold.length)
        if end == start:
            return Commit(Hold(len(key), match.node), start, end, None, None)
        tree_slots = self._concat(match.values)[start:end]
        return Commit(Hold(len(key), match.node), start, end, tree_slots, slots[start:end])

    def release(self, key: Sequence[Hashable], slots: S, hold: Hold) -> Optional[S]:
        """The request leaves with `key` computed (`slots` its slots): the tree takes what it does
        not have, the lock goes, and the slots the caller must free are returned (None: none)."""
        if not self.enabled:
            return slots[hold.length :] if len(slots) > hold.length else None
        done = self.commit(key, slots, hold)
        self.unlock(done.hold)
        return done.duplicates

    def evict(self, n_tokens: int) -> list[S]:
        """Free at least `n_tokens` unlocked tokens, least recently used first; their slots return."""
        return self.tree.evict(n_tokens) if n_tokens > 0 else []

    def flush(self) -> list[S]:
        """Drop every unlocked entry; their slots return."""
        return self.tree.flush()

    def reset(self) -> None:
        """Forget everything, locks included (after a failed step every slot was freed wholesale)."""
        self.tree = RadixTree()

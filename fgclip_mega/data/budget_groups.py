"""Grouping of a global sample stream into global batches that share one NaFlex patch budget.

FG-CLIP 2 packs every image of a batch at the batch's patch budget (upstream: the smallest
allowed budget holding the batch's largest image; NaFlex resizes each image, aspect kept, to
fill it), so one large image in a batch of small ones makes the whole batch cost up to 1024
patches. Here each sample's own budget ("bucket", known from the stored image size, no decode)
decides which global batch (micro x DP samples) it joins:

  * samples arrive one shuffle window at a time, in stream order; each goes to its bucket, and a
    bucket holding a full global batch emits it (FIFO);
  * at the end of a window, a bucket other than the largest that holds a sample read `patience`
    or more windows ago (default 1: in an earlier window) is merged one budget up, all of it;
    merges run from the top down, so a sample climbs at most one budget per window;
  * the largest bucket, once it holds such a sample, is completed with the largest waiting
    samples of the lower buckets (oldest first) if all waiting samples fill a global batch; if
    they do not, the next window's first samples go to the largest bucket (whatever their
    budget) until it is emitted.

So every bucket holds fewer than a global batch after each window (the carry is bounded by
len(budgets) x group_size samples); a sample is emitted within patience + len(budgets) windows
of its own (when a window has >= group_size samples); no sample is dropped or emitted twice.
A larger patience looks further ahead (fewer merges when a global batch is a large part of a
window) at the price of a longer wait. The procedure is a pure function of the stream: every DP
rank runs it on the same global stream and gets the same batches, so the micro-batches of one
step share one budget on every rank (the gathers of the global losses need equal shapes). The
state (buckets, emitted-but-unconsumed batches, window counter) is plain lists of ints for the
checkpoint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

Item = tuple[int, int, int]
"""(global sample id, epoch it was read in, serial number of the window that brought it)."""


class BudgetGrouper:
    def __init__(self, group_size: int, budgets: Sequence[int], patience: int = 1):
        if patience < 1:
            raise ValueError(f"patience={patience}: a sample must wait >= 1 window to be merged")
        if group_size < 1:
            raise ValueError(f"group_size={group_size}: a global batch needs >= 1 sample")
        budgets = tuple(int(b) for b in budgets)
        if not budgets or list(budgets) != sorted(set(budgets)):
            raise ValueError(f"budgets={budgets}: expected distinct ascending budgets")
        self.group_size = group_size
        self.budgets = budgets
        self.patience = patience  # windows a bucket may hold a sample before merging it up
        self.buckets: dict[int, list[Item]] = {b: [] for b in budgets}
        self.ready: deque[tuple[int, list[Item]]] = deque()
        self.serial = 0  # windows added so far
        self.feed_top = False  # route the next window's samples to the largest bucket first

    # ------------------------------------------------------------------ grouping

    def _push(self, budget: int, item: Item) -> None:
        bucket = self.buckets[budget]
        bucket.append(item)
        if len(bucket) == self.group_size:
            self.ready.append((budget, list(bucket)))
            bucket.clear()

    def add_window(self, ids: Sequence[int], epochs: Sequence[int], budgets: Sequence[int]) -> None:
        """One shuffle window's samples in stream order, each with its epoch and own budget."""
        top = self.budgets[-1]
        for sid, epoch, budget in zip(ids, epochs, budgets, strict=True):
            if budget not in self.buckets:
                raise ValueError(f"sample {sid}: budget {budget} is not one of {self.budgets}")
            if self.feed_top and self.buckets[top]:
                budget = top  # the largest bucket waited a window for lack of samples
            self._push(int(budget), (int(sid), int(epoch), self.serial))
        self.feed_top = False
        self._close_window()
        self.serial += 1

    def _close_window(self) -> None:
        bs = self.budgets
        # Decided before any merge, so a sample climbs one level per window (top-down order).
        old = self.serial - self.patience
        held = {b: any(s <= old for _, _, s in self.buckets[b]) for b in bs}
        for lo, hi in reversed(list(zip(bs[:-1], bs[1:], strict=True))):
            if held[lo]:
                moved, self.buckets[lo] = self.buckets[lo], []
                for item in moved:
                    self._push(hi, item)
        top = bs[-1]
        waiting = sum(len(v) for v in self.buckets.values())
        if held[top] and self.buckets[top] and waiting >= self.group_size:
            for b in reversed(bs[:-1]):
                while self.buckets[b] and self.buckets[top]:
                    self._push(top, self.buckets[b].pop(0))
        self.feed_top = held[top] and bool(self.buckets[top])

    def pop(self) -> tuple[int, list[Item]] | None:
        """The next global batch (budget, group_size items), or None until more windows come."""
        return self.ready.popleft() if self.ready else None

    def pending(self) -> int:
        """Samples read but not yet in a consumed batch (ready batches and buckets)."""
        return sum(len(v) for _, v in self.ready) + sum(len(v) for v in self.buckets.values())

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "group_size": self.group_size,
            "patience": self.patience,
            "budgets": list(self.budgets),
            "serial": self.serial,
            "feed_top": self.feed_top,
            "buckets": [[b, [list(it) for it in self.buckets[b]]] for b in self.budgets],
            "ready": [[b, [list(it) for it in items]] for b, items in self.ready],
        }

    @staticmethod
    def from_state(state: dict, group_size: int) -> BudgetGrouper:
        """The grouper of `state`; at another group_size (a DP-size or micro-batch change) its
        waiting samples are regrouped in their order: ready batches first, then the buckets."""
        budgets = [int(b) for b in state["budgets"]]
        g = BudgetGrouper(group_size, budgets, int(state["patience"]))
        g.serial = int(state["serial"])
        g.feed_top = bool(state["feed_top"])
        ready = [_batch(b, items) for b, items in state["ready"]]
        buckets = [_batch(b, items) for b, items in state["buckets"]]
        if group_size == int(state["group_size"]):
            g.ready.extend(ready)
            for b, items in buckets:
                g.buckets[b] = items
            return g
        for b, items in ready + buckets:
            for item in items:
                g._push(b, item)
        return g


def _batch(budget, items) -> tuple[int, list[Item]]:
    return int(budget), [(int(a), int(b), int(c)) for a, b, c in items]

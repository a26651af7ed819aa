"""FG-CLIP 2 evaluation loader: a held-out set once over, every image at its own patch budget.

The training loader (naflex_loader.py) packs each image at its global batch's budget, which
depends on the batch's other samples, hence on the DP size and the micro-batch size: the same
image would embed differently at DP 1 and DP 2. Evaluation instead packs every image at the
smallest allowed budget holding it natively (`sample_budget`, the budget upstream's inference
picks per image), so an image's embedding does not depend on the layout.

Plan: the first `max_samples` sample ids (all by default) grouped by own budget, ascending
sample id inside a budget, cut into global batches of micro_batch_size x dp_size; rank r reads
slice r. A budget's last, short global batch is filled up with that budget's first samples again,
so every rank gets full micro-batches and the same number of them (`num_batches`); the evaluator
drops the repeats by sample id (eval/collect.py). Reading, decoding, tokenizing and packing are
the training loader's (`_assemble`), ahead in its background thread.
"""

from __future__ import annotations

from collections.abc import Iterator

from fgclip_mega.data.naflex import NaFlexError
from fgclip_mega.data.naflex_loader import NaFlexLoaded, NaFlexLoader, sample_budget


class NaFlexEvalLoader(NaFlexLoader):
    """`num_batches` micro-batches of this rank, then StopIteration (not endless)."""

    def __init__(self, cfg, tokenizer=None, patch_size: int = 16, dp_rank: int = 0,
                 dp_size: int = 1, shards=None, max_samples: int | None = None):  # fmt: skip
        # Batches come on the CPU (the evaluator moves them), like the training loader's.
        super().__init__(
            cfg, tokenizer, patch_size=patch_size, dp_rank=dp_rank, dp_size=dp_size,
            shards=shards, patience=1,
        )  # fmt: skip
        total = int(self.shards.num_samples)
        n = total if max_samples is None else min(int(max_samples), total)
        by_budget: dict[int, list[int]] = {}
        for sid in range(n):
            shard, row = self._locate(sid)
            blk = self._block("sizes", shard, row)
            width, height = (int(v) for v in blk["image_sizes"][row - blk["start"]])
            try:
                budget = sample_budget(width, height, self.patch_size, self.budgets)
            except NaFlexError as e:
                raise NaFlexError(f"{self.shards.paths[shard]} row {row}: {e}") from None
            by_budget.setdefault(budget, []).append(sid)
        size = self.micro * self.dp
        self.plan: list[tuple[int, list[int]]] = []  # (budget, global batch of sample ids)
        for budget in sorted(by_budget):
            ids = by_budget[budget]
            for lo in range(0, len(ids), size):
                chunk = ids[lo : lo + size]
                chunk += [ids[i % len(ids)] for i in range(size - len(chunk))]  # repeats
                self.plan.append((budget, chunk))
        self.num_samples = n
        self._next_plan = 0

    @property
    def num_batches(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[NaFlexLoaded]:
        return self

    def __next__(self) -> NaFlexLoaded:
        depth = max(1, self.cfg.prefetch_queue_depth)
        while len(self._pending) < depth and self._next_plan < len(self.plan):
            budget, ids = self.plan[self._next_plan]
            self._next_plan += 1
            mine = [
                (sid, 0, 0) for sid in ids[self.rank * self.micro : (self.rank + 1) * self.micro]
            ]
            self._pending.append(
                (budget, mine, self._assembler.submit(self._assemble, budget, mine))
            )
        if not self._pending:
            raise StopIteration
        _, _, job = self._pending.popleft()
        self.steps += 1
        return job.result()


__all__ = ["NaFlexEvalLoader"]

"""The one batch convention: the **global** batch is the truth, the per-replica batch is derived from it.

Pure Python (no TensorFlow), so the tuner and the flag checks use the same rule as training."""
import dataclasses
from typing import Optional

from dtf.base.errors import UserError

_BATCH_ARGS = ("global_batch_size", "per_replica_batch_size")  # named in messages; the CLI shows them as flags


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How the global batch splits over replicas. Build it with `BatchPlan.create`."""

    global_batch_size: int
    num_replicas: int
    per_replica_batch_size: int = dataclasses.field(init=False)

    def __post_init__(self):
        g, n = self.global_batch_size, self.num_replicas
        if n < 1:
            raise UserError(f"the strategy has {n} replicas; it needs at least 1")
        if g < n:
            raise UserError(f"global_batch_size={g} is smaller than the {n} replicas (each needs at least one "
                            f"example); use global_batch_size >= {n}", arguments=_BATCH_ARGS)
        if g % n:
            low, high = g - g % n, g - g % n + n
            raise UserError(f"global_batch_size={g} is not divisible by the {n} replicas; use a multiple of {n} "
                            f"(e.g. {low} or {high}) or set per_replica_batch_size instead", arguments=_BATCH_ARGS)
        object.__setattr__(self, "per_replica_batch_size", g // n)

    @classmethod
    def create(cls, num_replicas: int, global_batch_size: Optional[int] = None,
               per_replica_batch_size: Optional[int] = None) -> "BatchPlan":
        """Exactly one of the two sizes; a per-replica size is turned into the global one (the truth)."""
        if (global_batch_size is None) == (per_replica_batch_size is None):
            raise UserError("give exactly one of global_batch_size or per_replica_batch_size, got "
                            f"global_batch_size={global_batch_size} per_replica_batch_size={per_replica_batch_size}",
                            arguments=_BATCH_ARGS)
        if per_replica_batch_size is not None:
            if per_replica_batch_size < 1:
                raise UserError(f"per_replica_batch_size={per_replica_batch_size} must be >= 1",
                                arguments=_BATCH_ARGS)
            global_batch_size = per_replica_batch_size * num_replicas
        return cls(global_batch_size=global_batch_size, num_replicas=num_replicas)

    def steps_per_epoch(self, num_examples: int, drop_remainder: bool = True) -> int:
        """Batches in one pass over `num_examples` (a partial last batch counts unless `drop_remainder`)."""
        g = self.global_batch_size
        steps = num_examples // g if drop_remainder else -(-num_examples // g)
        if steps < 1:
            raise UserError(f"global_batch_size={g} gives 0 steps per epoch for a dataset of {num_examples} "
                            f"examples; use global_batch_size <= {max(num_examples, 1)}", arguments=_BATCH_ARGS)
        return steps

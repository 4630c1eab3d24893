"""Full fine-tuning on a CPU: train the word-embedding rows the data uses, decay the rest lazily.

BERT's word embedding is a 30,522-row table (half of MiniLM's weights, a fifth of bert-base's),
but the Banking77 training split uses about 2,500 of its rows. Its dense gradient makes every
step zero a full-table buffer, clip it and run AdamW over it: about a tenth of a MiniLM step on a
CPU (profiled). Nothing of that is needed. A row whose gradient has always been zero has zero
AdamW moments, so AdamW's update of it is the weight decay alone, `p *= 1 - lr * weight_decay`;
the rows of tokens absent from the training split stay such rows for the whole run. So training
a compact copy of the used rows, and multiplying the other rows by the product of their decay
factors whenever the model's weights are read (`write_back`, before each evaluation), gives the
weights dense AdamW gives, up to float rounding, for a tenth of the work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UsedRows:
    """A trainable compact copy of the embedding rows in `used_ids`, and the others' decay."""

    def __init__(self, embedding: nn.Embedding, used_ids: torch.Tensor) -> None:
        weight = embedding.weight
        self.weight = weight
        self.rows = torch.unique(used_ids.to(weight.device))  # sorted
        self.compact = nn.Parameter(weight.detach()[self.rows].clone())
        # position of a used token's row in `compact`; unused tokens never reach the lookup
        self.remap = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        self.remap[self.rows] = torch.arange(len(self.rows), device=weight.device)
        unused = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        unused[self.rows] = False
        self.unused = unused.nonzero().squeeze(1)
        pad = embedding.padding_idx
        # the padding row gets no gradient in nn.Embedding; keep it so if the data uses it
        used_pad = pad is not None and bool(self.remap[pad] >= 0)
        self.padding_idx = int(self.remap[pad]) if used_pad else None
        self.pending_decay = 1.0  # product of (1 - lr * wd) since the last write-back

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.remap[ids], self.compact, self.padding_idx)

    def record_step(self, lr: float, weight_decay: float) -> None:
        """Account one optimizer step's decoupled weight decay of the unused rows."""
        self.pending_decay *= 1.0 - lr * weight_decay

    @torch.no_grad()
    def write_back(self) -> None:
        """Make the model's table current: used rows from the compact copy, the rest decayed."""
        self.weight[self.rows] = self.compact
        if self.pending_decay != 1.0:
            self.weight[self.unused] *= self.pending_decay
        self.pending_decay = 1.0

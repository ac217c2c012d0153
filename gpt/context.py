"""Context parallelism for the GPT's training (python -m lecture_flash.gpt.train
--context-parallel N under torchrun): every sequence of a batch sharded over N ranks, which
attend through lecture_flash.context_parallel's ring.

Each rank of a context-parallel group gets the same batch and keeps its zigzag shard of the
positions (chunks r and 2N - 1 - r of 2N, so the causal work is even): the embeddings of those
positions, every block with its attention replaced by the ring, and the loss of its targets.
Dropout in training (the lecture's 0.2), the attention's included, draws each rank's own masks
(train.py seeds each process apart): the same distribution as one process, not the same draws.
The loss is this rank's sum over B * T, times N: DistributedDataParallel averages the
gradients over every process, so each group's gradient comes out as its whole batch's mean
loss's, and several groups average as data-parallel processes do.
"""
import torch
import torch.nn.functional as F

from lecture_flash.context_parallel import ring_attention, shard


class ContextParallel:
    """GPT.forward for one context-parallel rank: `group` of `world` ranks, this one `rank`."""

    def __init__(self, group, world, rank):
        self.group, self.world, self.rank = group, world, rank

    def forward(self, model, idx, targets=None):
        """(this rank's logits (B, T_r, vocab), its share of the loss scaled as above)."""
        B, T = idx.shape
        pos = shard(torch.arange(T, device=idx.device), self.rank, self.world, dim=0)
        x = model.embed(shard(idx, self.rank, self.world, dim=1), pos)
        for block in model.blocks:
            x = block(x, self._ring(block.sa))
        logits = model.to_logits(x)
        loss = None
        if targets is not None:
            mine = shard(targets, self.rank, self.world, dim=1)
            loss = F.cross_entropy(logits.flatten(0, 1), mine.flatten(),
                                   reduction="sum") * (self.world / (B * T))
        return logits, loss

    def _ring(self, sa):
        def attend(q, k, v):
            return ring_attention(q, k, v, group=self.group, scale=sa.scale,
                                  dropout_p=sa.attn_dropout if sa.training else 0.0)
        return attend

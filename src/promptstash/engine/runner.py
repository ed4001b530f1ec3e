"""Turns scheduled chunks into one flattened StepBatch, runs the model, and hands back logits rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from promptstash.engine.scheduler import ScheduledChunk
from promptstash.models.llama import KVCache, LlamaModel, SeqAttention, StepBatch, causal_mask


@dataclass(frozen=True)
class StepLogits:
    """logits[rows[i]] are the float32 logits [*, V] of chunk i (empty slice when it needs none)."""

    logits: torch.Tensor
    rows: tuple[slice, ...]


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache) -> None:
        self.model = model
        self.kv = kv
        self.block_size = kv.block_size
        self.device = model.device
        self._offsets = torch.arange(self.block_size, device=self.device)

    def _slots(self, block_table: list[int], end: int) -> tuple[torch.Tensor, int | None]:
        """[end] pool slots of tokens 0..end-1 of a sequence, and the first slot if they are consecutive."""
        num_blocks = -(-end // self.block_size)
        blocks = block_table[:num_blocks]
        table = torch.tensor(blocks, dtype=torch.long, device=self.device)
        slots = (table[:, None] * self.block_size + self._offsets[None, :]).flatten()[:end]
        consecutive = blocks[-1] - blocks[0] == num_blocks - 1 and all(
            b - a == 1 for a, b in zip(blocks, blocks[1:], strict=False))
        return slots, blocks[0] * self.block_size if consecutive else None

    def run(self, chunks: list[ScheduledChunk], block_tables: list[list[int]]) -> StepLogits:
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_mapping: list[torch.Tensor] = []
        seqs: list[SeqAttention] = []
        logits_rows: list[int] = []
        rows: list[slice] = []
        window = self.model.config.sliding_window
        for chunk, table in zip(chunks, block_tables, strict=True):
            req, start, end = chunk.request, chunk.start, chunk.end
            t0 = len(input_ids)
            input_ids.extend(req.token_ids[start:end])
            context, context_start = self._slots(table, end)
            slot_mapping.append(context[start:end])
            positions.append(torch.arange(start, end, device=self.device))
            causal = start == 0 and end > 1 and (window is None or end <= window)
            mask = None if causal else causal_mask(end, end - start, window, self.device)
            seqs.append(SeqAttention(t0, t0 + end - start, context, context_start, mask, causal))
            first = len(logits_rows)
            if req.want_prompt_logits:
                logits_rows.extend(range(t0, t0 + end - start))
            elif end == len(req.token_ids):
                logits_rows.append(t0 + end - start - 1)
            rows.append(slice(first, len(logits_rows)))
        batch = StepBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device),
            positions=torch.cat(positions),
            slot_mapping=torch.cat(slot_mapping),
            seqs=tuple(seqs),
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=self.device),
        )
        return StepLogits(self.model.forward(batch, self.kv), tuple(rows))

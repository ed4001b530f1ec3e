"""Turns scheduled chunks into one flattened StepBatch, runs the model, and hands back logits rows.

Chunks of module assemblies (engine/assembly.py) compute arbitrary rows: an "encode" chunk computes a
module alone (positions from 0, attending only to the module's own slots), an "assemble" chunk computes
rows in position order, each attending to every slot up to its own position. A CacheBlend assemble chunk
runs in a forward of its own (forward_blend), which reports the rows it kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from promptstash.engine.scheduler import ScheduledChunk
from promptstash.models.llama import BlendSpec, KVCache, LlamaModel, SeqAttention, StepBatch, causal_mask


@dataclass(frozen=True)
class StepLogits:
    """logits[rows[i]] are the float32 logits [*, V] of chunk i (empty slice when it needs none);
    positions[rows[i]] are the prompt positions of those rows; kept[i]: for a CacheBlend chunk, the [rows]
    bool rows it recomputed in every layer (else None)."""

    logits: torch.Tensor
    rows: tuple[slice, ...]
    positions: torch.Tensor
    kept: tuple[torch.Tensor | None, ...]


def is_blend(chunk: ScheduledChunk) -> bool:
    return (chunk.kind == "assemble" and chunk.request.module_repair.strategy == "cacheblend"
            and any(m >= 0 for m in chunk.row_module))


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
        batched = [i for i, c in enumerate(chunks) if not is_blend(c) and c.num_tokens]
        parts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        if batched:
            batch, rows, positions = self._batch([chunks[i] for i in batched], [block_tables[i] for i in batched])
            logits = self.model.forward(batch, self.kv)
            for i, r in zip(batched, rows, strict=True):
                parts[i] = (logits[r], positions[r], None)
        for i, chunk in enumerate(chunks):
            if is_blend(chunk):
                batch, rows, positions = self._batch([chunk], [block_tables[i]])
                repair = chunk.request.module_repair
                candidates = torch.tensor([m >= 0 for m in chunk.row_module], device=self.device)
                num_keep = math.ceil(int(candidates.sum()) * repair.blend_fraction)
                layer = min(repair.blend_layer, len(self.model.layers) - 1)
                logits, kept = self.model.forward_blend(batch, self.kv, BlendSpec(layer, num_keep, candidates))
                parts[i] = (logits, positions[rows[0]], kept)
        vocab = self.model.vocab_size
        empty = torch.empty(0, vocab, device=self.device)
        out_logits, out_positions, out_rows, kept_all = [], [], [], []
        first = 0
        for i in range(len(chunks)):
            logits, positions, kept = parts.get(i, (empty, torch.empty(0, dtype=torch.long), None))
            out_logits.append(logits)
            out_positions.append(positions)
            out_rows.append(slice(first, first + logits.shape[0]))
            kept_all.append(kept)
            first += logits.shape[0]
        return StepLogits(torch.cat(out_logits) if out_logits else empty, tuple(out_rows),
                          torch.cat(out_positions) if out_positions else torch.empty(0, dtype=torch.long),
                          tuple(kept_all))

    def _batch(self, chunks: list[ScheduledChunk], block_tables: list[list[int]]
               ) -> tuple[StepBatch, list[slice], torch.Tensor]:
        """The flattened batch of chunks, each chunk's slice of the logits rows, and those rows' positions."""
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_mapping: list[torch.Tensor] = []
        seqs: list[SeqAttention] = []
        logits_rows: list[int] = []
        logits_positions: list[int] = []
        rows: list[slice] = []
        window = self.model.config.sliding_window
        for chunk, table in zip(chunks, block_tables, strict=True):
            req = chunk.request
            t0 = len(input_ids)
            first = len(logits_rows)
            if chunk.kind == "compute":
                start, end = chunk.start, chunk.end
                input_ids.extend(req.token_ids[start:end])
                context, context_start = self._slots(table, end)
                slot_mapping.append(context[start:end])
                positions.append(torch.arange(start, end, device=self.device))
                causal = start == 0 and end > 1 and (window is None or end <= window)
                mask = None if causal else causal_mask(end, end - start, window, self.device)
                seqs.append(SeqAttention(t0, t0 + end - start, context, context_start, mask, causal))
                chunk_positions = range(start, end)
            elif chunk.kind == "encode":  # a module alone: positions from 0, its own slots as context
                assert chunk.work is not None
                base = chunk.work.span.start
                start, end = chunk.rows[0], chunk.rows[-1] + 1
                input_ids.extend(req.token_ids[start:end])
                context, _ = self._slots(table, end)
                context = context[base:]
                slot_mapping.append(context[start - base:])
                positions.append(torch.arange(start - base, end - base, device=self.device))
                causal = start == base and end - base > 1 and (window is None or end - base <= window)
                mask = None if causal else causal_mask(end - base, end - start, window, self.device)
                seqs.append(SeqAttention(t0, t0 + end - start, context, None, mask, causal))
                chunk_positions = range(0)
            else:  # assemble: rows in position order, each attending to every slot up to its position
                row_pos = torch.tensor(chunk.rows, dtype=torch.long, device=self.device)
                end = chunk.rows[-1] + 1
                input_ids.extend(req.token_ids[r] for r in chunk.rows)
                context, context_start = self._slots(table, end)
                slot_mapping.append(context[row_pos])
                positions.append(row_pos)
                k_pos = torch.arange(end, device=self.device)[None, :]
                mask = k_pos <= row_pos[:, None]
                if window is not None:
                    mask &= (row_pos[:, None] - k_pos) < window
                seqs.append(SeqAttention(t0, t0 + len(chunk.rows), context, context_start, mask))
                chunk_positions = chunk.rows
            if chunk.kind != "encode":
                last = len(req.token_ids) - 1
                repairs = chunk.row_module or (-1,) * len(chunk_positions)
                for i, position in enumerate(chunk_positions):
                    # NOTE: module rows (repairs) give no logits: CacheBlend may drop them after its layer
                    if (req.want_prompt_logits and repairs[i] < 0) or position == last:
                        logits_rows.append(t0 + i)
                        logits_positions.append(position)
            rows.append(slice(first, len(logits_rows)))
        batch = StepBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device),
            positions=torch.cat(positions),
            slot_mapping=torch.cat(slot_mapping),
            seqs=tuple(seqs),
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=self.device),
        )
        return batch, rows, torch.tensor(logits_positions, dtype=torch.long)

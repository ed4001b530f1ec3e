"""Our own forward pass for the Llama family (Llama 2/3, Mistral, Qwen2/2.5) over a paged KV cache.

Qwen2 is Llama with a bias on the q/k/v projections; Mistral adds an optional sliding window.
Tokens of every sequence in a step are flattened into one batch of T rows (no padding): the linear
layers run once over all T rows, attention runs per sequence over that sequence's paged context.

    flattened step:   | seq 0 new tokens | seq 1 new tokens | ... |        T rows
    KV pool per layer: [num_slots, num_kv_heads, head_dim]; slot = block_id * block_size + offset
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from promptstash.config import cpu_has_native_bf16
from promptstash.errors import CorruptModelError, UnsupportedArchitectureError, UnsupportedFormatError
from promptstash.models.config import ModelConfig
from promptstash.models.quant import (
    QUANTIZED_FORMATS,
    WEIGHT_FORMATS,
    DenseLinear,
    QuantLinear,
    QuantWeight,
    concat_rows,
    quantize,
)


@dataclass(frozen=True)
class SeqAttention:
    """Attention inputs of one sequence in a step.

    token_start/token_end: its rows in the flattened batch (n = token_end - token_start new tokens).
    context_slots: [ctx_len] pool slots of every token it attends to, cached ones first, then the new
      ones (the new tokens are the last n). NOTE: the new tokens' K/V are written before attention.
    context_start: when those slots are one consecutive run, its first slot (attention then reads a view
      of the pool instead of gathering a copy); else None.
    mask: [n, ctx_len] bool (True = may attend), or None when every query sees the whole context
      (a single decode token without a sliding window) or when `causal` is set.
    causal: the chunk is the whole context (nothing before it): plain causal attention.
    """

    token_start: int
    token_end: int
    context_slots: torch.Tensor
    context_start: int | None
    mask: torch.Tensor | None
    causal: bool = False


@dataclass(frozen=True)
class StepBatch:
    """Everything one forward step needs, built by the runner."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long, absolute positions in each sequence
    slot_mapping: torch.Tensor  # [T] long, where each new token's K/V is written
    seqs: tuple[SeqAttention, ...]
    logits_indices: torch.Tensor  # [N] long, rows whose logits are returned


@dataclass(frozen=True)
class BlendSpec:
    """CacheBlend's selective recompute for a one-sequence batch whose K/V are already in the pool.

    Rows flagged in `candidates` are tokens whose K/V were filled from a cache. Every row is recomputed at
    layers 0..layer; at `layer`, the candidates whose fresh values deviate most from the filled ones (the
    num_keep largest squared differences) are kept, and from layer + 1 on only they and the other rows are
    computed; the rest keep their filled K/V in the deeper layers.
    """

    layer: int
    num_keep: int
    candidates: torch.Tensor  # [T] bool


class KVCache:
    """The paged K/V storage of every layer: k, v: [num_layers, num_blocks * block_size, H_kv, D]."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (config.num_layers, num_blocks * block_size, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()


UPCAST_MIN_ROWS = 32  # break-even of weight conversion vs slow half-precision matmul, measured on CPU


def choose_upcast_min_rows(in_features: int, out_features: int, dtype: torch.dtype) -> int:
    """Half precision on a CPU without half-precision instructions: 1 (every product, decode included, in
    float32) where a one-row product is faster converted than native, measured now on the model's largest
    layer; else UPCAST_MIN_ROWS. Some CPUs decode faster natively (half the bytes), others 20x slower."""
    from promptstash.models.quant import _time

    w_t = torch.randn(in_features, out_features).to(dtype)
    x = torch.randn(1, in_features).to(dtype)
    native = _time(lambda: x @ w_t, 3)
    converted = _time(lambda: (x.float() @ w_t.float()).to(dtype), 3)
    return 1 if converted < native else UPCAST_MIN_ROWS


def causal_mask(ctx_len: int, num_new: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """[num_new, ctx_len] visibility of the last num_new tokens of a ctx_len context (None = all visible)."""
    if num_new == 1 and (sliding_window is None or ctx_len <= sliding_window):
        return None
    q_pos = torch.arange(ctx_len - num_new, ctx_len, device=device)[:, None]
    k_pos = torch.arange(ctx_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= (q_pos - k_pos) < sliding_window
    return mask


def _inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    params = dict(config.rope_scaling)
    kind = config.rope_type
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(params["factor"])
    if kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedArchitectureError(f"unsupported rope type {kind!r}; supported: default, linear, llama3")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


Linear = DenseLinear | QuantLinear


@dataclass(frozen=True)
class DecoderLayer:
    ln1: torch.Tensor  # [hidden]
    qkv: Linear  # hidden -> (H_q + 2 H_kv) * D, q/k/v fused
    o: Linear  # H_q * D -> hidden
    ln2: torch.Tensor
    gate_up: Linear  # hidden -> 2 * inter, gate/up fused
    down: Linear  # inter -> hidden


class LlamaModel:
    """Weights plus a stateless forward; the KV lives in a KVCache passed to every call.

    `weights` maps HF names to float tensors, or to QuantWeight for weights already quantized (a GGUF read
    straight into int8/int4). NOTE: a dict passed in is consumed: each linear weight is removed from it once
    its layer is built, so a load holds one layer twice at most, not the whole model. `weight_format` says how
    linear weights are held (models/quant.py); float weights are quantized here when it is int8 or int4.
    `dtype` is the activations' and the KV's dtype.
    """

    def __init__(self, config: ModelConfig, weights: MutableMapping[str, torch.Tensor | QuantWeight],
                 dtype: torch.dtype, device: torch.device, weight_format: str | None = None,
                 dense_min_rows: int = 64) -> None:
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.weight_format = weight_format or str(dtype).removeprefix("torch.")
        quantized = self.weight_format in QUANTIZED_FORMATS
        if self.weight_format not in WEIGHT_FORMATS:
            raise UnsupportedFormatError(
                f"unknown weight format {self.weight_format!r}; supported: {', '.join(WEIGHT_FORMATS)}")
        # NOTE: on CPUs without bfloat16/float16 matrix instructions those matmuls are ~4x slower than
        # float32, so batches of at least UPCAST_MIN_ROWS rows (or every batch, where measured faster: see
        # choose_upcast_min_rows) compute in float32 from the half-precision
        # weights (converted per call; memory stays half-size) and round the result back.
        slow_half = self.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16()
        upcast = choose_upcast_min_rows(config.hidden_size, 2 * config.intermediate_size, dtype) if slow_half else None
        self._dense: list[DenseLinear] = []

        def raw(name: str) -> torch.Tensor | QuantWeight:
            if name not in weights:
                raise CorruptModelError(f"checkpoint is missing tensor {name!r}")
            return weights[name]

        def take(name: str) -> torch.Tensor:
            value = raw(name)
            assert isinstance(value, torch.Tensor), name
            return value.to(device=self.device, dtype=dtype)

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in weights else None

        def linear(names: list[str], bias_names: list[str] | None = None) -> DenseLinear | QuantLinear:
            """One linear layer over the row-wise concatenation of `names` (fused projections)."""
            biases = [maybe(n) for n in bias_names] if bias_names else []
            bias = torch.cat(biases) if biases and all(b is not None for b in biases) else None  # type: ignore[arg-type]
            parts = [raw(n) for n in names]
            layer: DenseLinear | QuantLinear
            if quantized:
                q = [p if isinstance(p, QuantWeight) else quantize(p, self.weight_format) for p in parts]
                if len({p.bits for p in q}) > 1:  # e.g. a GGUF's 4-bit q/k beside an 8-bit v: fuse at 8 bits
                    q = [p if p.bits == 8 else quantize(p.dequantize(), "int8") for p in q]
                layer = QuantLinear(q[0] if len(q) == 1 else concat_rows(q), bias, self.device, dense_min_rows)
            else:
                dense = torch.cat([(p.dequantize() if isinstance(p, QuantWeight) else p).to(device=self.device,
                                   dtype=dtype) for p in parts])
                layer = DenseLinear(dense, bias, upcast)
                self._dense.append(layer)
            del parts
            for name in names:
                if name != "model.embed_tokens.weight":  # also the tied head's: popped once both are built
                    weights.pop(name, None)
            return layer

        embed = raw("model.embed_tokens.weight")  # [V, hidden]
        if quantized:
            # NOTE: the embedding is int8 (rows dequantized at lookup) in both quantized formats
            self.embed_q: QuantWeight | None = embed if isinstance(embed, QuantWeight) else quantize(embed, "int8")
            self.embed = None
        else:
            self.embed_q = None
            self.embed = take("model.embed_tokens.weight")
        tied = config.tie_word_embeddings and "lm_head.weight" not in weights
        if tied and quantized and self.weight_format == "int8":
            assert self.embed_q is not None
            self.lm_head: DenseLinear | QuantLinear = QuantLinear(self.embed_q, None, self.device, dense_min_rows)
        elif tied and not quantized:
            self.lm_head = DenseLinear(self.embed, None, upcast)  # type: ignore[arg-type]
            self._dense.append(self.lm_head)
        else:
            self.lm_head = linear(["model.embed_tokens.weight" if tied else "lm_head.weight"])
        weights.pop("model.embed_tokens.weight", None)
        self.vocab_size = self.lm_head.out_features if isinstance(self.lm_head, QuantLinear) \
            else self.lm_head.w_t.shape[1]
        self.norm = take("model.norm.weight")
        self.layers: list[DecoderLayer] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            attn = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
            self.layers.append(DecoderLayer(
                ln1=take(p + "input_layernorm.weight"),
                qkv=linear(attn, [p + f"self_attn.{n}_proj.bias" for n in "qkv"]),
                o=linear([p + "self_attn.o_proj.weight"]),
                ln2=take(p + "post_attention_layernorm.weight"),
                gate_up=linear([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                down=linear([p + "mlp.down_proj.weight"]),
            ))
        # True: attention always runs sequence by sequence, so a row never depends on its batch (see
        # EngineConfig.batch_invariant); False: a step of decodes attends in one batched call
        self.batch_invariant = False
        self.inv_freq = _inv_freq(config).to(self.device)  # [D / 2] float32
        self.scale = 1.0 / math.sqrt(config.head_dim)

    @property
    def upcast_min_rows(self) -> int | None:
        return self._dense[0].upcast_min_rows if self._dense else None

    @upcast_min_rows.setter
    def upcast_min_rows(self, rows: int | None) -> None:
        for layer in self._dense:
            layer.upcast_min_rows = rows

    @property
    def weight_bytes(self) -> int:
        """Bytes held by the weights (linear layers, embedding, norms)."""
        total = self.norm.numel() * self.norm.element_size() + self.lm_head.nbytes
        for layer in self.layers:
            total += (layer.ln1.numel() + layer.ln2.numel()) * layer.ln1.element_size()
            total += layer.qkv.nbytes + layer.o.nbytes + layer.gate_up.nbytes + layer.down.nbytes
        if self.embed is not None and not (isinstance(self.lm_head, DenseLinear) and self.lm_head.w_t is self.embed):
            total += self.embed.numel() * self.embed.element_size()
        if self.embed_q is not None and not (isinstance(self.lm_head, QuantLinear) and self.lm_head.bits == 8
                                             and self.lm_head.values is self.embed_q.values):
            total += self.embed_q.values.numel() + self.embed_q.scale.numel() * 4
        return total

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_q is not None:
            return self.embed_q.rows(input_ids).to(self.dtype)
        assert self.embed is not None
        return self.embed[input_ids]

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Normalized in float32, rounded to the model dtype, then scaled (as HF does)."""
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.config.rms_norm_eps).to(x.dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos [T, 1, D] and the signed sin [T, 1, D] of `_apply_rope`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        sin = emb.sin()
        sin[:, : sin.shape[1] // 2].neg_()
        return emb.cos().to(self.dtype)[:, None, :], sin.to(self.dtype)[:, None, :]

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin, with rotate_half(x) = roll(x, D/2) * (-1 | +1): three ops."""
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)

    def move_keys(self, k: torch.Tensor, shift: int) -> torch.Tensor:
        """Keys written at positions i, as if they had been written at positions i + shift.

        k: [..., H_kv, D] post-RoPE keys. RoPE rotates each frequency pair by position x frequency, and
        rotations compose: R(i + shift) k = R(shift) R(i) k. The frequencies already hold any scaling
        (linear, llama3), so one rotation by `shift` moves every key. The angle is computed in float64.
        Values carry no position and need no change.
        """
        freqs = float(shift) * self.inv_freq.double()  # [D / 2]
        emb = torch.cat((freqs, freqs))  # [D]
        # NOTE: half-precision keys are rotated in float32 and rounded once, not at every operation
        work = torch.float32 if k.dtype in (torch.bfloat16, torch.float16) else k.dtype
        cos, sin = emb.cos().to(work), emb.sin().to(work)
        kw = k.to(work)
        return (kw * cos + _rotate_half(kw) * sin).to(k.dtype)

    def _decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One query token over its whole context: [H_q, D] x [ctx, H_kv, D] -> [H_q, D].

        Two batched matmuls per KV head group; the CPU flash-attention kernel is slow for a single query.
        Query head h reads KV head h // (H_q / H_kv), as in grouped-query attention. Computed in float32:
        half-precision bmm of these small shapes is 1.3-2x slower on CPU than converting first (measured).
        """
        h_kv = k.shape[1]
        qg = q.reshape(h_kv, -1, q.shape[-1]).float()  # [H_kv, G, D]
        scores = torch.bmm(qg, k.permute(1, 2, 0).float()) * self.scale  # [H_kv, G, ctx]
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, v.transpose(0, 1).float()).view(q.shape).to(q.dtype)  # [H_q, D]

    def _attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   seqs: tuple[SeqAttention, ...]) -> torch.Tensor:
        """Attention sequence by sequence: q [T, H_q, D] over each sequence's paged context -> [T, H_q, D]."""
        attn = torch.empty_like(q)
        for seq in seqs:
            qs = q[seq.token_start:seq.token_end].transpose(0, 1)[None]  # [1, H_q, n, D]
            if seq.context_start is not None:
                ctx = slice(seq.context_start, seq.context_start + seq.context_slots.shape[0])
                ks, vs = k_pool[ctx], v_pool[ctx]  # [ctx, H_kv, D] views
            else:
                ks, vs = k_pool.index_select(0, seq.context_slots), v_pool.index_select(0, seq.context_slots)
            if seq.token_end - seq.token_start == 1 and seq.mask is None:
                attn[seq.token_start] = self._decode_attention(q[seq.token_start], ks, vs)
                continue
            out = F.scaled_dot_product_attention(
                qs, ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],  # [1, H_kv, ctx, D]
                attn_mask=seq.mask, is_causal=seq.causal, scale=self.scale, enable_gqa=True)
            attn[seq.token_start:seq.token_end] = out[0].transpose(0, 1)
        return attn

    def _decode_gather(self, seqs: tuple[SeqAttention, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a step of B >= 2 single-token decodes: the padded slot table [B, L] of their contexts and the
        additive mask [B, 1, 1, L] (0 = attend, -inf = padding), built once for all layers. None otherwise
        (prefill in the step, one sequence, or batch_invariant: then attention runs sequence by sequence)."""
        if self.batch_invariant or len(seqs) < 2 or any(
                s.token_end - s.token_start != 1 or s.mask is not None for s in seqs):
            return None
        lengths = [int(s.context_slots.shape[0]) for s in seqs]
        longest = max(lengths)
        #   slots:  seq b: | its context_len slots | its first slot repeated (padding) |   L = longest
        table = torch.stack([F.pad(s.context_slots, (0, longest - n), value=int(s.context_slots[0]))
                             for s, n in zip(seqs, lengths, strict=True)])
        pad = torch.arange(longest, device=self.device)[None, :] >= torch.tensor(lengths, device=self.device)[:, None]
        bias = torch.zeros(pad.shape, dtype=torch.float32, device=self.device).masked_fill_(pad, float("-inf"))
        return table, bias[:, None, None, :]

    def _batched_decode_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                  table: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Every decode token of the step in one call: q [B, H_q, D] over its padded context -> [B, H_q, D].

        Float32 like `_decode_attention`; a row's result matches its own call up to summation order.
        """
        b, h_q, d = q.shape
        h_kv = k_pool.shape[1]
        ks = k_pool[table].float()  # [B, L, H_kv, D]
        vs = v_pool[table].float()
        qg = q.reshape(b, h_kv, h_q // h_kv, d).float()  # [B, H_kv, G, D]
        scores = torch.matmul(qg, ks.permute(0, 2, 3, 1)) * self.scale + bias  # [B, H_kv, G, L]
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, vs.transpose(1, 2)).reshape(b, h_q, d).to(q.dtype)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: KVCache) -> torch.Tensor:
        """Run one step; writes the new tokens' K/V into kv and returns float32 logits [N, V]."""
        return self._forward(batch, kv, None)[0]

    @torch.inference_mode()
    def forward_blend(self, batch: StepBatch, kv: KVCache, blend: BlendSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """forward() with CacheBlend's selection (one sequence); also returns the [T] bool rows kept."""
        assert len(batch.seqs) == 1, "blend runs one sequence at a time"
        return self._forward(batch, kv, blend)

    def _forward(self, batch: StepBatch, kv: KVCache, blend: BlendSpec | None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        num_tokens = batch.input_ids.shape[0]
        h_q, h_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        positions, slot_mapping, seqs = batch.positions, batch.slot_mapping, batch.seqs
        logits_indices = batch.logits_indices
        kept = torch.ones(num_tokens, dtype=torch.bool, device=self.device)
        cos, sin = self._rope(positions)  # [T, 1, D]
        hidden = self._embed(batch.input_ids)  # [T, hidden]
        decode = self._decode_gather(seqs) if blend is None else None
        for i, layer in enumerate(self.layers):
            x = self._rms_norm(hidden, layer.ln1)
            qkv = layer.qkv(x)  # [T, (H_q + 2 H_kv) * D]
            qk = self._apply_rope(qkv[:, :(h_q + h_kv) * d].view(num_tokens, h_q + h_kv, d), cos, sin)
            q, k = qk[:, :h_q], qk[:, h_q:]  # [T, H_q, D], [T, H_kv, D]
            v = qkv[:, (h_q + h_kv) * d:]
            k_pool, v_pool = kv.k[i], kv.v[i]  # [num_slots, H_kv, D]
            if blend is not None and i == blend.layer:
                kept = self._blend_select(blend, v.reshape(num_tokens, h_kv, d), v_pool, slot_mapping)
            k_pool.index_copy_(0, slot_mapping, k)
            v_pool.index_copy_(0, slot_mapping, v.reshape(num_tokens, h_kv, d))
            if decode is not None:
                attn = self._batched_decode_attention(q, k_pool, v_pool, *decode)  # [T, H_q, D]
            else:
                attn = self._attention(q, k_pool, v_pool, seqs)
            hidden = hidden + layer.o(attn.view(num_tokens, h_q * d))
            x = self._rms_norm(hidden, layer.ln2)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            hidden = hidden + layer.down(F.silu(gate) * up)
            if blend is not None and i == blend.layer and not bool(kept.all()):
                # from here on only the kept rows are computed (NOTE: logits rows are never candidates)
                rows = kept.nonzero().squeeze(1)
                new_index = torch.cumsum(kept, 0) - 1
                hidden, cos, sin = hidden[rows], cos[rows], sin[rows]
                positions, slot_mapping = positions[rows], slot_mapping[rows]
                logits_indices = new_index[logits_indices]
                num_tokens = rows.shape[0]
                seq = seqs[0]
                ctx_len = seq.context_slots.shape[0]
                mask = torch.arange(ctx_len, device=self.device)[None, :] <= positions[:, None]
                if seq.mask is not None:  # e.g. a sliding window: keep the kept rows' own visibility
                    mask = seq.mask[rows]
                seqs = (SeqAttention(0, num_tokens, seq.context_slots, seq.context_start, mask),)
        last = self._rms_norm(hidden.index_select(0, logits_indices), self.norm)
        return self.lm_head(last).float(), kept

    @staticmethod
    def _blend_select(blend: BlendSpec, v: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor
                      ) -> torch.Tensor:
        """[T] bool: non-candidate rows, and the num_keep candidates whose fresh values deviate most from the
        pool's (CacheBlend's default measure: values carry no position, so only the missing context shows)."""
        old_v = v_pool.index_select(0, slot_mapping)
        deviation = (v - old_v).float().pow(2).sum((1, 2))  # [T]
        deviation = torch.where(blend.candidates, deviation, torch.full_like(deviation, -1.0))
        kept = ~blend.candidates
        num_keep = min(blend.num_keep, int(blend.candidates.sum()))
        if num_keep > 0:
            kept = kept.clone()
            kept[torch.topk(deviation, num_keep).indices] = True
        return kept

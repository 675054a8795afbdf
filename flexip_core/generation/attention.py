"""Gated decoupled cross-attention (FlexIP): text + w_pres * preservation + w_pers * personalization.

    out = Attn(q, K_text, V_text) + w_pres * Attn(q, K_pres, V_pres) + w_pers * Attn(q, K_pers, V_pers)

Each term has its own softmax. Branch tokens and per-sample weights arrive per call through
`cross_attention_kwargs={"flexip": BranchInputs(...)}`; nothing per request is stored on the processor.
The text projection code follows diffusers' `AttnProcessor2_0` / `IPAdapterAttnProcessor2_0`.

Fused (the default on SDPA): the text and every acting branch in one attention call. Their keys and values are
stacked along the batch, each padded to one length and the padding masked with -inf, the query repeated once per
term; each branch's weight multiplies its values (w · Attn(q, K, V) = Attn(q, K, w · V)), and the terms are summed.
Exact up to float rounding: each term keeps its own softmax. The stacked keys, values and mask are built once per
generation, like the branch keys and values.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor
from torch.nn import functional as F

from flexip_core.generation.adapters import BranchKV

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "xformers")


def xformers_available() -> bool:
    """True when xformers imports (it may still lack kernels for this torch; see `xformers_usable`)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken binary build
        return False
    return True


@functools.cache
def xformers_usable(device: str = "cuda") -> str | None:
    """None when xformers runs one fp16 attention call on `device`, else why not.

    An xformers wheel built for another torch or CUDA imports fine but has no kernels, so only a real call tells.
    """
    if not xformers_available():
        return "the xformers package is not installed (pip install -r requirements-gpu.txt)"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "xformers needs CUDA"
    import xformers.ops

    probe = torch.zeros(1, 8, 1, 40, device=device, dtype=torch.float16)  # (B, N, heads, head_dim)
    try:
        xformers.ops.memory_efficient_attention(probe, probe, probe)
    except Exception as error:  # NotImplementedError when no operator was built for this torch/CUDA
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"xformers {xformers.__version__} cannot run on this torch {torch.__version__}: {first}"
    return None


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def pick_backend(requested: str | None, device: torch.device) -> str:
    """'xformers' on CUDA when it runs there, else 'sdpa'; an explicit request is honoured or refused clearly."""
    if requested is None or requested == "auto":
        if device.type != "cuda" or not xformers_available():
            return "sdpa"
        problem = xformers_usable(str(device))
        if problem:
            _warn_once(f"{problem}; using PyTorch SDPA attention")
            return "sdpa"
        return "xformers"
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} unknown; choose one of {', '.join(BACKENDS)} or 'auto'")
    if requested == "xformers":
        if device.type != "cuda":
            raise ValueError("the xformers backend needs CUDA; use 'sdpa'")
        problem = xformers_usable(str(device))
        if problem:
            raise ValueError(f"{problem}; use 'sdpa' or reinstall xformers for this torch")
    return requested


@dataclass
class BranchInputs:
    """Per-call inputs of the gated processors for one denoising step (batch B includes CFG copies)."""

    pres_tokens: torch.Tensor  # (B, Np, C) preservation tokens
    pers_tokens: torch.Tensor  # (B, Nq, C) personalization tokens
    w_pres: torch.Tensor  # (B,) preservation weight per sample
    w_pers: torch.Tensor  # (B,) personalization weight per sample
    pres_on: bool  # False when w_pres is 0 for the whole batch: the branch is skipped
    pers_on: bool  # False when w_pers is 0 for the whole batch
    cache: dict | None = field(default_factory=dict)  # per-generation keys/values by layer; None: no reuse (training)
    kv_calls: list = field(default_factory=lambda: [0])  # how many key/value projections ran (tests count them)
    pres_bias: torch.Tensor | None = None  # (Np,) added to the preservation logits: log of each token's photo share
    pers_bias: torch.Tensor | None = None  # (Nq,) the same for the personalization branch (None: one photo)


def _attend(query, key, value, backend: str, mask=None) -> torch.Tensor:
    """Multi-head attention on (B, heads, N, d) tensors; returns (B, N, heads * d)."""
    batch, heads, _, dim = query.shape
    if backend == "xformers":
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=mask
        )  # (B, N, heads, d)
        return out.reshape(batch, -1, heads * dim)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, heads * dim)  # (B, N, heads*d)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)  # (B, heads, N, d)


def _stacked_weights(flexip: BranchInputs, weights: list, batch: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(G*B, 1, 1, 1) weight of each stacked term's rows (1 for the text, None in `weights`) and where it is 0;
    built once per step for all layers (the step's weights are new tensors)."""
    hit = flexip.cache.get("stacked_weights") if flexip.cache is not None else None
    if hit is not None and len(hit[0]) == len(weights) and all(a is b for a, b in zip(hit[0], weights)):
        return hit[1]
    device = next(w for w in weights if w is not None).device
    rows = [torch.ones(batch, device=device, dtype=dtype) if w is None else w.to(dtype) for w in weights]
    stacked = torch.cat(rows).view(-1, 1, 1, 1)  # (G*B, 1, 1, 1)
    result = (stacked, stacked == 0)
    if flexip.cache is not None:
        flexip.cache["stacked_weights"] = (tuple(weights), result)
    return result


class GatedCrossAttnProcessor:
    """Cross-attention processor with a gated preservation and personalization branch."""

    def __init__(self, kv: BranchKV, backend: str = "sdpa", fused: bool = True):
        self.kv = kv
        self.backend = backend
        self.fused = fused and backend == "sdpa"  # xformers takes no broadcast mask: it keeps one call per term

    def _cached(self, flexip: BranchInputs | None, name: str, source: torch.Tensor, project) -> torch.Tensor:
        """Project `source` once per generation: the result is reused while `source` is the same tensor."""
        if flexip is None or flexip.cache is None:
            return project(source)
        slot = flexip.cache.setdefault(id(self), {})
        hit = slot.get(name)
        if hit is not None and hit[0] is source:
            return hit[1]
        value = project(source)
        flexip.kv_calls[0] += 1
        slot[name] = (source, value)
        return value

    def _fused_attention(self, flexip: BranchInputs, query, key, value, text, heads: int) -> torch.Tensor:
        """Attn(q, K_text, V_text) + Σ w · Attn(q, K_branch, V_branch) over the acting branches, in one SDPA call;
        `key`, `value`: the text's, (B, heads, 77, d), projected from `text`. Returns (B, HW, heads * d)."""
        terms, sources = [(None, key, value, None)], [text]
        for branch, on, tokens, weight, bias in (
            ("pres", flexip.pres_on, flexip.pres_tokens, flexip.w_pres, flexip.pres_bias),
            ("pers", flexip.pers_on, flexip.pers_tokens, flexip.w_pers, flexip.pers_bias),
        ):
            if on:
                k = self._cached(flexip, f"k_{branch}", tokens, getattr(self.kv, f"to_k_{branch}"))
                v = self._cached(flexip, f"v_{branch}", tokens, getattr(self.kv, f"to_v_{branch}"))
                terms.append((weight, _heads(k, heads), _heads(v, heads), bias))
                sources += [branch, tokens, bias]
        # (G*B, heads, L, d) twice, (G*B, 1, 1, L)
        keys, values, mask = self._stacked(flexip, terms, tuple(sources), query.dtype)
        weights, absent = _stacked_weights(flexip, [t[0] for t in terms], query.shape[0], values.dtype)  # (G*B,1,1,1)
        # a sample's branch at weight 0 is absent, even if fp16 overflowed its values (0 * inf = NaN)
        values = torch.where(absent, 0.0, values * weights)  # (G*B, heads, L, d)
        groups, (batch, _, length, dim) = len(terms), query.shape
        out = F.scaled_dot_product_attention(query.repeat(groups, 1, 1, 1), keys, values, attn_mask=mask)
        # the terms added, read in (HW, heads) order so that the sum comes out as the next layer wants it (no copy)
        out = out.view(groups, batch, heads, length, dim).transpose(2, 3).sum(0)  # (B, HW, heads, d)
        return out.reshape(batch, length, heads * dim).to(query.dtype)  # (B, HW, heads*d)

    def _stacked(self, flexip: BranchInputs, terms: list, parts: tuple, dtype) -> tuple[torch.Tensor, ...]:
        """The terms' keys and values stacked along the batch, zero-padded to one length (a multiple of 8, which
        SDPA's fused kernels want of a mask), and the additive mask (0 or the photo-share bias on real keys, -inf on
        padding); reused while every part they come from (text, tokens, biases) is the same tensor (a generation)."""
        slot = None if flexip.cache is None else flexip.cache.setdefault(id(self), {})
        hit = slot.get("stacked") if slot is not None else None
        if hit is not None and len(hit[0]) == len(parts) and all(a is b for a, b in zip(hit[0], parts)):
            return hit[1]
        longest = max(k.shape[2] for _, k, _, _ in terms)
        length = -(-longest // 8) * 8
        pad = lambda t: F.pad(t, (0, 0, 0, length - t.shape[2]))  # (B, heads, L, d)
        keys = torch.cat([pad(k) for _, k, _, _ in terms])  # (G*B, heads, L, d)
        values = torch.cat([pad(v) for _, _, v, _ in terms])  # (G*B, heads, L, d)
        batch = terms[0][1].shape[0]
        mask = torch.full((len(terms), length), float("-inf"), device=keys.device, dtype=dtype)  # (G, L)
        for row, (_, k, _, bias) in zip(mask, terms):
            row[:k.shape[2]] = 0.0 if bias is None else bias.to(dtype)
        mask = mask.repeat_interleave(batch, dim=0).view(-1, 1, 1, length)  # (G*B, 1, 1, L)
        if slot is not None:
            slot["stacked"] = (parts, (keys, values, mask))
        return keys, values, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 flexip: BranchInputs | None = None, **kwargs):
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # (B, HW, C)
        batch = hidden_states.shape[0]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = _heads(attn.to_q(hidden_states), attn.heads)  # (B, heads, HW, d)
        key = _heads(self._cached(flexip, "k_text", encoder_hidden_states, attn.to_k), attn.heads)
        value = _heads(self._cached(flexip, "v_text", encoder_hidden_states, attn.to_v), attn.heads)
        fuse = self.fused and attention_mask is None and flexip is not None and (flexip.pres_on or flexip.pers_on)
        if fuse:  # the text and the acting branches in one call
            out = self._fused_attention(flexip, query, key, value, encoder_hidden_states, attn.heads)
        else:
            out = _attend(query, key, value, self.backend, attention_mask).to(query.dtype)  # (B, HW, inner)

        if flexip is not None and not fuse:
            for branch, on, tokens, weight, bias in (
                ("pres", flexip.pres_on, flexip.pres_tokens, flexip.w_pres, flexip.pres_bias),
                ("pers", flexip.pers_on, flexip.pers_tokens, flexip.w_pers, flexip.pers_bias),
            ):
                if not on:
                    continue  # zero weight for the whole batch: no projection, no attention
                k = self._cached(flexip, f"k_{branch}", tokens, getattr(self.kv, f"to_k_{branch}"))
                v = self._cached(flexip, f"v_{branch}", tokens, getattr(self.kv, f"to_v_{branch}"))
                mask = None if bias is None else bias.to(query.dtype).view(1, 1, 1, -1)  # photo shares, in logits
                backend = self.backend if mask is None else "sdpa"  # SDPA broadcasts the (1, 1, 1, N) bias
                branch_out = _attend(query, _heads(k, attn.heads), _heads(v, attn.heads), backend, mask)
                weight = weight.to(out.dtype).view(-1, 1, 1)  # (B, 1, 1)
                # where a sample's weight is 0 its branch is absent, even if fp16 overflowed it (0 * inf = NaN)
                out = out + torch.where(weight == 0, 0.0, weight * branch_out.to(out.dtype))  # (B, HW, inner)

        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SelfAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor, accepting (and ignoring) the `flexip` keyword of cross-attention layers."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 flexip=None, *args, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class XFormersSelfAttnProcessor(XFormersAttnProcessor):
    """diffusers' xformers processor, accepting (and ignoring) the `flexip` keyword."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 flexip=None, *args, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_processors(unet, adapter, backend: str, fused: bool = True) -> None:
    """Give every attn2 layer a gated processor over `adapter.kv`, and every other layer a plain one; `fused`: the
    text and both branches in one attention call (SDPA only), else one call per term."""
    from flexip_core.generation.adapters import is_cross_attention, layer_key

    processors = {}
    for name in unet.attn_processors:
        if is_cross_attention(name):  # not AnimateDiff's motion modules: temporal self-attention, plain processors
            processors[name] = GatedCrossAttnProcessor(adapter.kv[layer_key(name)], backend, fused)
        else:
            processors[name] = XFormersSelfAttnProcessor() if backend == "xformers" else SelfAttnProcessor()
    unet.set_attn_processor(processors)

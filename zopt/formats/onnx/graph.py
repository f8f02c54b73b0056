"""The Z-Image transformer rewritten as a tensor-in / tensor-out graph that ONNX can hold.

``ZImageTransformer2DModel.forward`` takes Python lists, pads each item to a multiple of 32 tokens
in Python loops, builds boolean masks only when batch items differ, and applies RoPE with complex
numbers. None of that survives ``torch.onnx.export`` with dynamic shapes. :class:`ZImageGraph`
computes the same function from plain tensors, using the model's own weights:

* inputs ``latents (B, C, H, W)``, ``timestep (B,)``, ``text_embeds (B, L, cap_dim)`` (zero padded)
  and ``text_lens (B,)`` (int64, the real token count of each row); output ``sample (B, C, H, W)``;
* SEQ_MULTI_OF padding is reproduced with index arithmetic (gather with a clamped index, then
  ``where(pad, pad_token, x)``), so no zero-sized tensor ever appears, whatever the shape;
* the caption section is laid out at the padded batch length for every row; keys past a row's own
  padded length are masked, which is exactly the eager model's batch padding;
* RoPE is real-valued: cos/sin tables computed as the eager model does (float64 angles, rounded
  to float32) are stored as initializers and gathered by position ids computed in the graph;
* half-precision variants run only the large matmuls in fp16/bf16; norms, softmax, RoPE, the
  timestep/caption/patch embedders, adaLN and the final layer stay in fp32 (``zimage.SENSITIVE``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SEQ_MULTI_OF = 32  # diffusers' transformer_z_image.SEQ_MULTI_OF
PATCH = 2  # all_patch_size[0]; all_f_patch_size is 1 for single images


def rope_tables(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """cos/sin tables per RoPE axis, ``{"rope_cos_0": (axes_lens[0], axes_dims[0] // 2), ...}``.

    Same arithmetic as diffusers' ``RopeEmbedder.precompute_freqs_cis`` (float64 angles cast to
    float32, then cos/sin in float32 as ``torch.polar`` does), so gathering reproduces it exactly.
    """
    out = {}
    theta = float(config["rope_theta"])
    for i, (d, e) in enumerate(zip(config["axes_dims"], config["axes_lens"], strict=True)):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        ang = torch.outer(torch.arange(e, dtype=torch.float64), freqs).float()
        out[f"rope_cos_{i}"] = torch.cos(ang)
        out[f"rope_sin_{i}"] = torch.sin(ang)
    return out


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _linear(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """fp32 in, fp32 out; a half-precision weight runs its matmul in that precision.

    An export skeleton carries ``weight_t`` (in, out) instead of ``weight``: the graph then holds a
    plain ``MatMul(x, W)`` with W an initializer, the pattern onnxruntime's quantizers and
    TensorRT's weight folding look for (``F.linear`` would leave a Transpose on the weight).
    """
    wt = getattr(mod, "weight_t", None)
    if wt is None:
        wt = mod.weight.t()
    y = torch.matmul(x.float() if wt.dtype == torch.float32 else x.to(wt.dtype), wt)
    y = y.float()
    return y if mod.bias is None else y + mod.bias.float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x0, x1) of ``x (B, S, H, D)`` by angles with ``cos/sin (B, S, 1, D/2)``."""
    xr = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class ZImageGraph(nn.Module):
    """Wraps a ``ZImageTransformer2DModel`` (any device, including meta) for export.

    ``forward(latents, timestep, text_embeds, text_lens) -> sample`` equals
    ``model([l[:, None] for l in latents], timestep, [e[:n] for e, n in zip(text_embeds, text_lens)])``.
    ``half`` (torch.float16 / torch.bfloat16 / None) casts the non-sensitive linear weights.
    """

    def __init__(self, model: nn.Module, half: torch.dtype | None = None, tables: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.model = model
        cfg = dict(model.config)
        self.dim, self.heads = cfg["dim"], cfg["n_heads"]
        self.eps, self.t_scale = cfg["norm_eps"], cfg["t_scale"]
        self.key = f"{cfg['all_patch_size'][0]}-{cfg['all_f_patch_size'][0]}"
        tables = tables if tables is not None else rope_tables(cfg)
        for name, t in tables.items():
            self.register_buffer(name, t.to(next(model.parameters()).device), persistent=True)
        if half is not None:
            for name, mod in model.named_modules():
                if isinstance(mod, nn.Linear):
                    mod.weight.data = mod.weight.data.to(half_policy(f"{name}.weight", half, mod.weight.shape))


    # -- building blocks ---------------------------------------------------------------------

    def _attention(self, attn, h, cos, sin, bias):
        q = _linear(attn.to_q, h).unflatten(-1, (self.heads, -1))
        k = _linear(attn.to_k, h).unflatten(-1, (self.heads, -1))
        v = _linear(attn.to_v, h).unflatten(-1, (self.heads, -1))
        q = _rope(_rms(q, attn.norm_q.weight, attn.norm_q.eps), cos, sin)
        k = _rope(_rms(k, attn.norm_k.weight, attn.norm_k.eps), cos, sin)
        wq = getattr(attn.to_q, "weight_t", None)
        mm = (wq if wq is not None else attn.to_q.weight).dtype  # the body's matmul precision
        scale = q.shape[-1] ** -0.5
        q, k, v = ((t * scale if t is q else t).transpose(1, 2).to(mm) for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)).float()
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores, dim=-1)  # fp32: sensitive
        out = torch.matmul(probs.to(mm), v).float().transpose(1, 2).flatten(2)
        return _linear(attn.to_out[0], out)

    def _ffn(self, ff, x):
        a, b = _linear(ff.w1, x), _linear(ff.w3, x)
        return _linear(ff.w2, F.silu(a) * b)

    def _block(self, blk, x, cos, sin, bias, adaln):
        if blk.modulation:
            mod = _linear(blk.adaLN_modulation[0], adaln).unsqueeze(1)
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=2)
            h = _rms(x, blk.attention_norm1.weight, self.eps) * (1.0 + scale_msa)
            x = x + torch.tanh(gate_msa) * _rms(self._attention(blk.attention, h, cos, sin, bias),
                                                blk.attention_norm2.weight, self.eps)
            h = _rms(x, blk.ffn_norm1.weight, self.eps) * (1.0 + scale_mlp)
            return x + torch.tanh(gate_mlp) * _rms(self._ffn(blk.feed_forward, h), blk.ffn_norm2.weight, self.eps)
        h = _rms(x, blk.attention_norm1.weight, self.eps)
        x = x + _rms(self._attention(blk.attention, h, cos, sin, bias), blk.attention_norm2.weight, self.eps)
        h = _rms(x, blk.ffn_norm1.weight, self.eps)
        return x + _rms(self._ffn(blk.feed_forward, h), blk.ffn_norm2.weight, self.eps)

    def _timestep(self, t):
        te = self.model.t_embedder
        half = te.frequency_embedding_size // 2
        freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32) / half)
        args = (t.float() * self.t_scale)[:, None] * freqs[None].to(t.device)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return _linear(te.mlp[2], F.silu(_linear(te.mlp[0], emb)))

    def _freqs(self, f_idx, h_idx, w_idx):
        """Gather cos/sin (B, S, 1, head_dim/2) for position ids broadcastable to (B, S)."""
        shape = torch.broadcast_shapes(f_idx.shape, h_idx.shape, w_idx.shape)
        parts = [(getattr(self, f"rope_cos_{a}")[i].expand(*shape, -1), getattr(self, f"rope_sin_{a}")[i].expand(*shape, -1))
                 for a, i in enumerate((f_idx, h_idx, w_idx))]
        cos = torch.cat([p[0] for p in parts], dim=-1).unsqueeze(2)
        sin = torch.cat([p[1] for p in parts], dim=-1).unsqueeze(2)
        return cos, sin

    # -- forward -----------------------------------------------------------------------------

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor,
                text_lens: torch.Tensor) -> torch.Tensor:
        m = self.model
        b, c, hh, ww = latents.shape
        ht, wt = hh // PATCH, ww // PATCH
        n_img = ht * wt
        n_img_p = (n_img + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF
        n_txt = text_embeds.shape[1]
        n_txt_p = (n_txt + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF
        dev = latents.device
        lens = text_lens.to(torch.int64)
        lens_p = (lens + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF  # each row's padded caption length

        adaln = self._timestep(timestep)

        # image tokens: patchify (pF, pH, pW, C order), pad by repeating the last, embed, pad token
        x = latents.float().reshape(b, c, ht, PATCH, wt, PATCH).permute(0, 2, 4, 3, 5, 1).reshape(b, n_img, -1)
        tok = torch.arange(n_img_p, device=dev)
        x = x.index_select(1, tok.clamp(max=n_img - 1))  # the eager model repeats the last token
        x = _linear(m.all_x_embedder[self.key], x)
        img_pad = (tok >= n_img)[None, :, None]
        x = torch.where(img_pad, m.x_pad_token.float(), x)
        # image positions: (row's padded caption length + 1, h, w); pad tokens at (0, 0, 0)
        is_pad = tok >= n_img
        f_idx = torch.where(is_pad[None, :], torch.zeros_like(lens)[:, None], (lens_p + 1)[:, None])
        # row/col from a grid rather than tok // wt, tok % wt (symbolic remainder does not export)
        src = tok.clamp(max=n_img - 1)
        rows = torch.arange(ht, device=dev)[:, None].expand(ht, wt).reshape(-1).index_select(0, src)
        cols = torch.arange(wt, device=dev)[None, :].expand(ht, wt).reshape(-1).index_select(0, src)
        h_idx = torch.where(is_pad, torch.zeros_like(tok), rows)[None, :]
        w_idx = torch.where(is_pad, torch.zeros_like(tok), cols)[None, :]
        x_cos, x_sin = self._freqs(f_idx, h_idx, w_idx)

        for blk in m.noise_refiner:  # every row has the same image length: no mask
            x = self._block(blk, x, x_cos, x_sin, None, adaln)

        # caption tokens: embed, pad token past each row's length, keys valid up to its padded length
        j = torch.arange(n_txt_p, device=dev)
        cap = text_embeds.float().index_select(1, j.clamp(max=n_txt - 1))
        cap = _linear(m.cap_embedder[1], _rms(cap, m.cap_embedder[0].weight, m.cap_embedder[0].eps))
        cap_pad = j[None, :] >= lens[:, None]
        cap = torch.where(cap_pad[..., None], m.cap_pad_token.float(), cap)
        cap_valid = j[None, :] < lens_p[:, None]
        zero = torch.zeros_like(j)[None, :]
        c_cos, c_sin = self._freqs((j + 1)[None, :], zero, zero)
        neg = torch.full((), float("-inf"), device=dev)
        cap_bias = torch.where(cap_valid, torch.zeros((), device=dev), neg)[:, None, None, :]
        for blk in m.context_refiner:
            cap = self._block(blk, cap, c_cos, c_sin, cap_bias, None)

        # unified sequence [image, caption]; keys past a row's own length are masked
        u = torch.cat([x, cap], dim=1)
        u_cos = torch.cat([x_cos.expand(b, -1, -1, -1), c_cos.expand(b, -1, -1, -1)], dim=1)
        u_sin = torch.cat([x_sin.expand(b, -1, -1, -1), c_sin.expand(b, -1, -1, -1)], dim=1)
        u_valid = torch.cat([torch.ones_like(img_pad[:, :, 0]).expand(b, -1), cap_valid], dim=1)
        u_bias = torch.where(u_valid, torch.zeros((), device=dev), neg)[:, None, None, :]
        for blk in m.layers:
            u = self._block(blk, u, u_cos, u_sin, u_bias, adaln)

        # final layer on the real image tokens only, then unpatchify
        fl = m.all_final_layer[self.key]
        u = u[:, :n_img]
        scale = 1.0 + _linear(fl.adaLN_modulation[1], F.silu(adaln)).unsqueeze(1)
        u = _linear(fl.linear, F.layer_norm(u, (self.dim,), eps=fl.norm_final.eps) * scale)
        u = u.reshape(b, ht, wt, PATCH, PATCH, c).permute(0, 5, 1, 3, 2, 4)
        return u.reshape(b, c, hh, ww)


def graph_inputs(config: dict[str, Any], batch: int = 2, height: int = 16, width: int = 12, text_len: int = 37,
                 seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Example inputs (latent height/width in latent pixels; must be even)."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(batch, config["in_channels"], height, width, generator=g)
    t = torch.rand(batch, generator=g)
    emb = torch.randn(batch, text_len, config["cap_feat_dim"], generator=g)
    lens = torch.tensor([text_len - 5 * i for i in range(batch)], dtype=torch.int64).clamp(min=1)
    return lat, t, emb, lens


def half_policy(name: str, half: torch.dtype | None, shape: tuple[int, ...], policy: Any = None) -> torch.dtype:
    """The dtype tensor ``name`` (diffusers name) of ``shape`` is stored in for an export with
    ``half``: ``half`` where ``policy`` (default: :class:`zopt.policy.Policy` without patterns)
    quantizes it, float32 where it keeps it."""
    from ...policy import Policy

    if half is not None and (policy or Policy()).decide(name, tuple(shape)).quantize:
        return half
    return torch.float32


def skeleton(config: dict[str, Any], half: torch.dtype | None = None, policy: Any = None) -> ZImageGraph:
    """A value-free ``ZImageGraph`` for tracing: every tensor is a zero-stride CPU view (no memory).

    Linear layers carry ``weight_t`` (in, out) in their storage dtype; the weights themselves are
    written later, one tensor at a time, by :func:`zopt.formats.onnx.export.export`.
    """
    from ..common import empty_model

    model = empty_model(config)

    def hollow(shape, dtype):
        return torch.zeros((), dtype=dtype).expand(*shape)

    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            w = mod._parameters.pop("weight")
            dt = half_policy(f"{name}.weight", half, tuple(w.shape), policy)
            mod.register_parameter("weight_t", nn.Parameter(hollow((w.shape[1], w.shape[0]), dt), requires_grad=False))
    for name, p in list(model.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if p.device.type == "meta":
            mod._parameters[attr] = nn.Parameter(hollow(p.shape, torch.float32), requires_grad=False)
    tables = {k: hollow(v.shape, torch.float32) for k, v in rope_tables(config).items()}
    return ZImageGraph(model, None, tables=tables).eval()

"""Train the micro Z-Image on procedural shapes: the VAE (reconstruction), then the transformer.

The transformer learns flow matching as Z-Image does: for clean latents x0, noise e and sigma in
(0, 1], x = (1 - sigma) x0 + sigma e; the model sees timestep 1 - sigma and predicts x0 - e, which is
exactly what ``ZImagePipeline`` feeds it and negates into the Euler step of
``FlowMatchEulerDiscreteScheduler`` (sigmas shifted by ``SCHEDULER_CONFIG["shift"]``, so training
draws sigma through the same shift). Captions are encoded once by the frozen text encoder, with
the pipeline's chat template and hidden layer. Deterministic given the seed and thread count.

    nice -n 10 python -m zopt.families.zimage.micro.train --out zopt/families/zimage/micro/weights
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import adherence as A
from . import model as M
from . import shapes as S

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL


@dataclass
class TrainConfig:
    seed: int = 0
    n_train: int = 20000  # scenes, seeds [seed * 10**5, ... + n_train): all below the held-out seeds
    max_shapes: int = M.MAX_SHAPES  # shapes per training scene (and per held-out prompt)
    vae_scenes: int = 4000  # the first scenes of the training set, for the VAE
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 64  # crop side (64: whole images; smaller crops change the normalization statistics)
    vae_lr: float = 3e-3
    # loss weight of the shapes' pixels (VAE) and latent cells (transformer) over the background's:
    # 1 + foreground * coverage. The shapes cover about a tenth of an image; unweighted, both models
    # spend thousands of steps on the flat backgrounds before they draw a shape at its place
    foreground: float = 4.0
    dit_steps: int = 16000
    dit_batch: int = 16
    dit_lr: float = 2e-3
    warmup: int = 30
    cap_dropout: float = 0.1  # share of training captions replaced by the empty prompt (guidance)
    ema: float = 0.99
    eval_every: int = 1000
    eval_prompts: int = 48
    steps: int = 8  # sampling steps for evaluation
    threads: int = 1


def shifted_sigma(u, shift: float):
    """The scheduler's time shift: sigma = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def noisy(x0, noise, sigma):
    """Flow-matching interpolation at ``sigma`` (1: pure noise, 0: clean); sigma per sample."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def model_timestep(sigma):
    """What ``ZImagePipeline`` passes the transformer at ``sigma``: (1000 - 1000 sigma) / 1000."""
    return 1 - sigma


def velocity_target(x0, noise):
    """What the transformer predicts: x0 - noise (the pipeline negates it into d x / d sigma)."""
    return x0 - noise


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def encode_captions(texts: list[str], tokenizer, text_encoder, batch: int = 256) -> dict[str, torch.Tensor]:
    """caption -> (tokens, 256) fp32 hidden states, as ``ZImagePipeline._encode_prompt`` computes them."""
    import torch

    out: dict[str, torch.Tensor] = {}
    uniq = sorted(set(texts))
    with torch.no_grad():
        for i in range(0, len(uniq), batch):
            chunk = uniq[i:i + batch]
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                     add_generation_prompt=True, enable_thinking=True) for t in chunk]
            enc = tokenizer(prompts, padding="longest", return_tensors="pt")
            mask = enc.attention_mask.bool()
            hs = text_encoder(input_ids=enc.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
            for t, h, m in zip(chunk, hs, mask, strict=True):
                out[t] = h[m].float().clone()
    return out


def foreground_weights(masks: np.ndarray, factor: float, cell: int = 1):
    """(n, 1, h / cell, w / cell) loss weights 1 + factor * m, where m is a shape's coverage grown by
    one pixel (its edge counts: that is where a blurred decoder loses the shape) and, for cell > 1,
    the largest over each cell (a latent cell that holds any of a shape)."""
    import torch
    import torch.nn.functional as F

    m = F.max_pool2d(torch.from_numpy(masks)[:, None], 3, 1, 1)
    if cell > 1:
        m = F.max_pool2d(m, cell)
    return 1 + factor * m


def train_vae(images: np.ndarray, cfg: TrainConfig, log, masks: np.ndarray | None = None) -> AutoencoderKL:
    """An ``AutoencoderKL`` of ``M.VAE_CONFIG`` fitted to ``images`` (L1 + MSE + a small KL, each
    pixel weighted by :func:`foreground_weights` of ``masks`` when given)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**M.VAE_CONFIG).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed + 1)
    t0 = time.perf_counter()
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _cosine(step, cfg.vae_steps, cfg.warmup)
        idx = rng.integers(0, min(len(images), cfg.vae_scenes), cfg.vae_batch)
        oy, ox = rng.integers(0, M.IMAGE_SIZE - cfg.vae_crop + 1, 2)
        crop = images[idx, oy:oy + cfg.vae_crop, ox:ox + cfg.vae_crop]
        x = torch.from_numpy(np.ascontiguousarray(crop)).permute(0, 3, 1, 2).float() / 127.5 - 1
        w = (foreground_weights(masks[idx, oy:oy + cfg.vae_crop, ox:ox + cfg.vae_crop], cfg.foreground)
             if masks is not None else torch.ones_like(x[:, :1]))
        post = vae.encode(x).latent_dist
        # decode the mean: sampling at the initial unit variance drowns the signal and stalls
        # learning, and the pipeline only ever decodes the transformer's (mean-trained) latents
        rec = vae.decode(post.mean).sample
        kl = post.kl().mean() / x[0].numel()
        err = rec - x
        loss = (w * (err.abs() + err ** 2)).mean() / w.mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.3f} {time.perf_counter() - t0:.0f}s")
    return vae.eval()


def encode_latents(vae, images: np.ndarray, batch: int = 128) -> torch.Tensor:
    """Latent means (n, 16, h, w) of ``images``, before scaling."""
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
            outs.append(vae.encode(x).latent_dist.mean)
    return torch.cat(outs)


def evaluate(pipe, prompts: list[str], steps: int, seed: int = 0) -> tuple[dict[str, float], np.ndarray]:
    """Adherence of the pipeline's images for ``prompts`` (prompt i with seed + i, starting from
    zopt's ``initial_latents`` as ``zopt generate`` does), and the images."""
    import torch

    from ....runtime.pipeline import initial_latents

    images = []
    pipe.set_progress_bar_config(disable=True)
    for i in range(0, len(prompts), 16):
        chunk = prompts[i:i + 16]
        lat = torch.cat([initial_latents(pipe, seed + i + j, M.IMAGE_SIZE, M.IMAGE_SIZE, torch.float32)
                         for j in range(len(chunk))])
        out = pipe(prompt=chunk, height=M.IMAGE_SIZE, width=M.IMAGE_SIZE, num_inference_steps=steps,
                   guidance_scale=0.0, latents=lat, output_type="np", max_sequence_length=128).images
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    images = np.concatenate(images)
    return A.score_many(images, prompts).accuracy(), images


def train_transformer(latents, caps: list[str], feats: dict, vae, tokenizer, text_encoder, cfg: TrainConfig, log,
                      on_eval=None, weights=None):
    """A ``ZImageTransformer2DModel`` of ``M.TRANSFORMER_CONFIG`` trained by flow matching (each
    latent cell's error weighted by ``weights``, (n, 1, h, w), when given); returns the EMA model and
    its last held-out adherence (``on_eval`` sees every evaluation)."""
    import copy

    import torch
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(cfg.seed + 2)
    model = ZImageTransformer2DModel(**M.TRANSFORMER_CONFIG).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.dit_lr, weight_decay=0.01, betas=(0.9, 0.99))
    rng = np.random.default_rng(cfg.seed + 3)
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    shift = M.SCHEDULER_CONFIG["shift"]
    prompts = A.held_out_prompts(cfg.eval_prompts, max_shapes=cfg.max_shapes)
    acc: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(cfg.dit_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.dit_lr * _cosine(step, cfg.dit_steps, cfg.warmup)
        idx = rng.integers(0, len(latents), cfg.dit_batch)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.rand(len(idx), generator=gen)
        # half the batch at the sampler's own sigmas (before shift) for cfg.steps steps
        on_grid = torch.rand(len(idx), generator=gen) < 0.5
        grid = torch.linspace(1.0, 1.0 / cfg.steps, cfg.steps)
        u = torch.where(on_grid, grid[torch.randint(0, cfg.steps, (len(idx),), generator=gen)], u)
        sigma = shifted_sigma(u, shift)
        xt = noisy(x0, noise, sigma)
        # a share of empty captions teaches the unconditional prediction that guidance needs
        texts = ["" if d else caps[i] for i, d in zip(idx, rng.random(len(idx)) < cfg.cap_dropout, strict=True)]
        out = model(list(xt.unsqueeze(2).unbind(0)), model_timestep(sigma), [feats[t] for t in texts],
                    return_dict=False)[0]
        w = weights[idx] if weights is not None else torch.ones_like(x0[:, :1])
        loss = (w * (torch.stack(out).squeeze(2) - velocity_target(x0, noise)) ** 2).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        if step % 10 == 0:
            log(f"dit step {step} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s")
        if (step + 1) % cfg.eval_every == 0 or step == cfg.dit_steps - 1:
            with torch.no_grad():
                acc, images = evaluate(M.build_pipeline(ema, vae, tokenizer, text_encoder), prompts, cfg.steps)
            log(f"dit step {step + 1} held-out adherence " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
            if on_eval:
                on_eval(step + 1, ema, acc, images)
    return ema, acc


def save_weights(out: Path, transformer, vae, tokenizer, record: dict) -> None:
    """transformer.safetensors and vae.safetensors (bf16), tokenizer/, micro.json."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name, mod in (("transformer", transformer), ("vae", vae)):
        sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in mod.state_dict().items()}
        save_file(sd, out / f"{name}.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "micro.json").write_text(json.dumps(record, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the weights")
    ap.add_argument("--work", help="folder to keep (and reuse) the encoded captions and the trained VAE")
    for f, v in asdict(TrainConfig()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    out = Path(args.out)
    log_file = (out.parent / f"{out.name}.log")
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        line = f"[{time.perf_counter() - t_start:7.0f}s] {msg}"
        print(line, flush=True)
        with open(log_file, "a") as f:
            f.write(line + "\n")

    log(f"config {asdict(cfg)}")
    scenes = [S.sample_scene(i, cfg.max_shapes) for i in range(cfg.seed * 10**5, cfg.seed * 10**5 + cfg.n_train)]
    images = np.stack([S.render(sc, M.IMAGE_SIZE) for sc in scenes])
    caps = [S.caption(sc) for sc in scenes]
    masks = np.stack([S.coverage(sc, M.IMAGE_SIZE) for sc in scenes])
    log(f"rendered {len(images)} scenes")
    tokenizer = M.build_tokenizer()
    text_encoder = M.build_text_encoder(tokenizer)
    work = Path(args.work) if args.work else None
    if work and (work / "captions.pt").exists():
        feats = torch.load(work / "captions.pt")
    else:
        held_out = A.held_out_prompts(cfg.eval_prompts, max_shapes=cfg.max_shapes)
        feats = encode_captions(["", *caps, *held_out], tokenizer, text_encoder)
        if work:
            work.mkdir(parents=True, exist_ok=True)
            torch.save(feats, work / "captions.pt")
    log(f"encoded {len(feats)} captions")
    if work and (work / "vae.pt").exists():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**M.VAE_CONFIG)
        vae.load_state_dict(torch.load(work / "vae.pt"))
        vae.eval()
    else:
        vae = train_vae(images, cfg, log, masks)
        if work:
            torch.save(vae.state_dict(), work / "vae.pt")
    with torch.no_grad():
        lat = encode_latents(vae, images)
        shift_f, scale_f = lat.mean().item(), 1.0 / lat.std().item()
    vae.register_to_config(shift_factor=shift_f, scaling_factor=scale_f)
    latents = (lat - shift_f) * scale_f
    with torch.no_grad():
        rec = vae.decode(lat[:256]).sample
        x = torch.from_numpy(images[:256]).permute(0, 3, 1, 2).float() / 127.5 - 1
        psnr = 10 * math.log10(4 / ((rec.clamp(-1, 1) - x) ** 2).mean().item())
        rec_img = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    vae_acc = A.score_many(rec_img, caps[:256]).accuracy()
    log(f"vae psnr {psnr:.2f} dB, reconstruction adherence {vae_acc}; latent shift {shift_f:.4f} scale {scale_f:.4f}")

    best = [-1.0]

    def on_eval(step, ema, acc, imgs):
        # keep the best evaluation so far (mean of colour, shape and position accuracy)
        score = (acc["colour"] + acc["shape"] + acc["position"]) / 3
        if score <= best[0]:
            return
        best[0] = score
        record = {"train_config": asdict(cfg), "transformer_config": M.TRANSFORMER_CONFIG,
                  "vae_config": dict(vae.config), "scheduler_config": M.SCHEDULER_CONFIG,
                  "vae_psnr_db": round(psnr, 2), "dit_steps_done": step, "held_out_adherence": acc,
                  "train_seconds": round(time.perf_counter() - t_start)}
        save_weights(out, ema, vae, tokenizer, record)
        from PIL import Image

        n = len(imgs) // 8 * 8
        grid = imgs[:n].reshape(n // 8, 8, *imgs.shape[1:]).transpose(0, 2, 1, 3, 4).reshape(
            n // 8 * imgs.shape[1], 8 * imgs.shape[2], 3)
        Image.fromarray(grid).save(out.parent / f"{out.name}-step{step}.png")

    cell = M.IMAGE_SIZE // latents.shape[-1]
    weights = foreground_weights(masks, cfg.foreground, cell)
    _, acc = train_transformer(latents, caps, feats, vae, tokenizer, text_encoder, cfg, log, on_eval, weights)
    log(f"done in {time.perf_counter() - t_start:.0f}s: held-out adherence {acc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

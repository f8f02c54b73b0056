"""Training's flow-matching convention is the one ZImagePipeline samples with."""

import torch

from zopt.families.zimage.micro import model as M
from zopt.families.zimage.micro import train as T


def _oracle(x0):
    """The micro transformer class whose forward predicts, with training's convention, the velocity
    toward one known clean latent."""
    from diffusers import ZImageTransformer2DModel

    class Oracle(ZImageTransformer2DModel):
        forward = _forward

    model = Oracle(**M.TRANSFORMER_CONFIG)
    model.x0, model.seen = x0, []
    return model


def _forward(self, x, t, cap_feats, **kwargs):
        sigma = 1 - t  # inverse of T.model_timestep
        self.seen.append(float(sigma[0]))
        xt = torch.stack(x).squeeze(2)
        s = sigma.view(-1, 1, 1, 1)
        noise = (xt - (1 - s) * self.x0) / s  # inverse of T.noisy
        assert torch.allclose(T.model_timestep(sigma), t)
        return (list(T.velocity_target(self.x0, noise).unsqueeze(2).unbind(0)),)


def test_pipeline_sampling_inverts_training_convention():
    from diffusers import AutoencoderKL

    g = torch.Generator().manual_seed(0)
    side = 32 // 2 ** (len(M.VAE_CONFIG["block_out_channels"]) - 1)  # latents of a 32 px image
    x0 = torch.randn(1, 16, side, side, generator=g)
    oracle = _oracle(x0)
    vae = AutoencoderKL(**M.VAE_CONFIG)
    pipe = M.build_pipeline(oracle, vae)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=["a small red circle in the centre on a blue background"], height=32, width=32,
               num_inference_steps=8, guidance_scale=0.0, generator=g, output_type="latent").images
    # the Euler steps of an exact velocity land on x0
    assert torch.allclose(out, x0, atol=1e-4)
    # the sigmas it visited are training's shifted grid
    grid = T.shifted_sigma(torch.linspace(1.0, 1.0 / 8, 8), M.SCHEDULER_CONFIG["shift"])
    assert torch.allclose(torch.tensor(oracle.seen), grid, atol=1e-6)

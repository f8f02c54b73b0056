"""The sampling options shared by ``zopt generate`` and ``zopt bench`` (presets, guidance, schedule)."""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(p: argparse.ArgumentParser, steps_default: str = "turbo 8, base 28") -> None:
    """``--preset``, ``--steps``, ``--guidance``, ``--negative-prompt``, CFG and schedule options.

    Every default is None here: a value given on the command line overrides the preset's.
    """
    p.add_argument("--preset", default="auto", choices=["auto", "turbo", "base"],
                   help="recommended settings: turbo (8 steps, guidance 0), base (28 steps, guidance 4); auto: "
                        "the checkpoint's variant (docs/zimage.md). Explicit options override the preset")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default: the preset's: {steps_default})")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale: pos + g*(pos-neg); 0 = off (Turbo), 3-5 for Base (default: the preset's)")
    p.add_argument("--negative-prompt", action="append", default=None, metavar="TEXT",
                   help="negative prompt (used with guidance > 0); repeat to give one per prompt")
    p.add_argument("--cfg-normalization", nargs="?", type=float, const=1.0, default=None, metavar="FACTOR",
                   help="cap the guided prediction's norm at FACTOR (default 1) x the positive one's (realism)")
    p.add_argument("--no-cfg-normalization", dest="cfg_normalization", action="store_const", const=0.0,
                   help="no norm cap (stylized images; the presets' default)")
    p.add_argument("--cfg-truncation", type=float, default=None, metavar="T",
                   help="stop guidance on steps whose normalized time 1-sigma exceeds T (0-1; 1 = never)")
    p.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                   help="prompt tokens the text encoder reads (default 512, as diffusers; longer prompts are cut)")
    p.add_argument("--shift", type=float, default=None, help="scheduler time shift (default: the pipeline's, 3.0)")
    p.add_argument("--sigmas", default=None, metavar="S1,S2,...",
                   help="custom decreasing schedule in (0,1] before the shift; its length is the step count")


def explicit(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling values given on the command line (None: not given), checked (exit 2 on bad input)."""
    from ..runtime.sampling import check, parse_sigmas

    values = {"steps": args.steps, "guidance": args.guidance, "cfg_normalization": args.cfg_normalization,
              "cfg_truncation": args.cfg_truncation, "max_sequence_length": args.max_sequence_length,
              "shift": args.shift, "sigmas": parse_sigmas(args.sigmas)}
    check(**values)
    return values


def negatives(given: list[str] | None, n_prompts: int) -> list[str | None]:
    """One negative prompt per prompt from the repeated ``--negative-prompt`` (one for all, or one each)."""
    from ..errors import ZoptError

    given = list(given or [])
    if not given:
        return [None] * n_prompts
    if len(given) == 1:
        return given * n_prompts
    if len(given) != n_prompts:
        raise ZoptError(f"--negative-prompt given {len(given)} times for {n_prompts} prompts: give one, or one per "
                        "prompt")
    return given

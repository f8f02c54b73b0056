"""The planner's answer for every simulated machine, as the table in docs/runtime.md.

``python -m zopt.runtime.plan_table`` prints it; ``--write docs/runtime.md`` replaces the block
between the markers there (a test checks the doc is current).
"""

from __future__ import annotations

import sys
from pathlib import Path

START, END = "<!-- plan-table:start -->", "<!-- plan-table:end -->"


def markdown(width: int = 1024, height: int = 1024) -> str:
    """One row per profile in :mod:`zopt.platform.fakes`: the recommendation and its predictions."""
    from ..platform.fakes import PROFILES
    from .costs import fmt_seconds
    from .planner import GIB, plan

    lines = ["| machine | device | usable | format | backend | offload | text encoder | VAE | peak | step | image | vs ideal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, hw in PROFILES.items():
        p = plan(hw, width, height)
        r = p.recommended
        head = f"| {name} | {hw.device_name} | {p.budget / GIB:.1f} GiB |"
        if r is None:
            lines.append(f"{head} nothing fits | | | | | | | | {p.reason.split(': ', 1)[1]} |")
            continue
        lines.append(f"{head} {r.spec} | {r.backend or '-'} | {r.offload} | {r.text_encoder} | "
                     f"{'tiled' if r.vae_tiling else 'full'} | {r.device_bytes / GIB:.1f} GiB | "
                     f"{fmt_seconds(r.step_s)} | {fmt_seconds(r.image_s)} | {p.slowdown:.2f}x |")
    return "\n".join(lines) + "\n"


def write(doc: Path) -> bool:
    """Replace the table in ``doc``; True when it changed."""
    text = doc.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = f"{head}{START}\n{markdown()}{END}{tail}"
    if new != text:
        doc.write_text(new)
    return new != text


def current(doc: Path) -> str:
    """The table as it stands in ``doc``."""
    text = doc.read_text()
    return text.partition(START)[2].partition(END)[0].lstrip("\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        print("updated" if write(Path(sys.argv[2])) else "unchanged", sys.argv[2])
    else:
        sys.stdout.write(markdown())

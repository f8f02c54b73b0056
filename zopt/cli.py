"""The ``zopt`` command: parses arguments and calls the library, nothing else.

Each subcommand lives in ``zopt/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; only the chosen one is imported, so ``zopt --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, str] = {
    "inspect": "show family, layout, parameter count, dtypes and bytes of a checkpoint (headers only)",
    "convert": "convert a checkpoint to gguf:TYPE, fp8, int8, int8_w8a8, int4, nf4, onnx, tensorrt, bf16...",
    "generate": "generate images with any variant (the embedded tiny model by default)",
    "doctor": "show this machine's hardware and which backend runs each format (or why not)",
    "plan": "recommend format, offload and attention for a memory budget (--vram 8GB --resolution 1024x1024)",
    "bench": "benchmark formats here: memory, latency, quality vs reference; table, JSON, HTML report, CI gate",
    "calibrate": "run the model over calibration prompts and write an importance matrix (GGUF imatrix)",
    "synth": "write a seeded synthetic checkpoint (full size: 6.15B params, 12.3 GB bf16), streaming",
    "publish": "assemble a Hub-ready folder (files, measured model card, checksums) and optionally --push",
    "verify": "re-check a published folder or one artifact: every sha256, every variant loads",
}


def _top_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(
        prog="zopt",
        description="Convert, run and benchmark Z-Image / Z-Image-Turbo transformers on the hardware you own.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {k:<10} {v}" for k, v in COMMANDS.items())
        + "\n\nRun 'zopt COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"zopt {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    return p


BROKEN_PIPE_EXIT = 1  # what rich's Console exits with on a closed pipe; Python's docs suggest the same


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (a reader that closed the pipe early is not an error)."""
    try:
        try:
            return _main(argv)
        finally:  # also on SystemExit (--help): output still buffered would fail at interpreter exit
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE_EXIT


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's flush at exit does not raise on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a descriptor
        pass


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
        os.environ["ZOPT_DEBUG"] = "1"
    cmd = next((a for a in argv if not a.startswith("-")), None)
    if cmd not in COMMANDS:
        top = _top_parser()
        if cmd is None:
            top.parse_args(argv)  # handles --help / --version
            top.print_help()
            return 0
        top.parse_args(argv)  # prints "invalid choice" and exits 2
        return 2
    rest = argv[argv.index(cmd) + 1 :]
    mod = importlib.import_module(f"zopt.commands.{cmd}")
    parser = argparse.ArgumentParser(prog=f"zopt {cmd}", description=COMMANDS[cmd])
    mod.add_arguments(parser)
    args = parser.parse_args(rest)
    return _run(mod, args, debug)


def _run(mod, args, debug: bool) -> int:
    from .errors import ZoptError

    try:
        return int(mod.run(args) or 0)
    except BrokenPipeError:
        raise  # the reader went away (`zopt plan | head`): main() exits quietly
    except ZoptError as e:
        if debug:
            raise
        print(f"zopt: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("zopt: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print("zopt: error: out of memory", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, I/O: the OS's words and the path, one line
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"zopt: error: {where}{e.strerror or e.__class__.__name__}", file=sys.stderr)
        return 2
    except Exception as e:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"zopt: internal error: {e.__class__.__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

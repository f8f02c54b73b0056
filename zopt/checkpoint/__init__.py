"""The one read path: every checkpoint zopt reads goes through :func:`open`.

A :class:`TensorSource` lists names, shapes and dtypes from headers alone and materializes one
tensor at a time. Safetensors tensors are memory-mapped region by region, so a tensor's pages are
released as soon as the caller drops it: streaming a 12 GB file never keeps 12 GB resident.
"""


from __future__ import annotations

import os
import re
from pathlib import Path

from .. import validate
from ..errors import CorruptFile, OfflineError, PickleRefused, SourceNotFound, ZoptError
from .base import (
    PICKLE_SUFFIXES,
    SAFETENSORS_DTYPES,
    TensorInfo,
    TensorSource,
    _short,
    read_at,
)
from .gguf import GGUFSource
from .pickled import PickleSource
from .safetensors import MultiSource, SafetensorsFile, _open_diffusers_folder, _read_config

__all__ = ["GGUFSource", "MultiSource", "PickleSource", "SAFETENSORS_DTYPES", "SafetensorsFile", "TensorInfo",
           "TensorSource", "open", "read_at"]

# --------------------------------------------------------------------------------------------
# hub


_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")


def _resolve_hub(spec: str, patterns: list[str] | None = None) -> Path:
    """Resolve ``owner/name[@revision]`` to a local snapshot folder via huggingface_hub's cache.

    The cache is tried first. Only if that misses is the network used, after a quick reachability
    check, so an offline machine fails at once instead of hanging in retries.
    """
    m = _HUB_ID.match(spec)
    assert m
    repo_id, revision = m.group(1), m.group(2)
    from huggingface_hub import snapshot_download

    patterns = patterns or ["model_index.json", "transformer/*"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or not _endpoint_reachable(constants.ENDPOINT):
        raise OfflineError(
            "not in the local Hugging Face cache and the Hub is unreachable (offline); "
            "download it elsewhere or pass a local folder",
            spec,
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise SourceNotFound(f"cannot fetch from the Hub ({_short(e)})", spec) from None


def hub_id_of(path: str | os.PathLike) -> str | None:
    """``owner/name@<commit>`` when ``path`` lies in a huggingface_hub cache snapshot
    (``models--owner--name/snapshots/<commit>/...``), else None."""
    parts = Path(path).parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots" and \
                re.fullmatch(r"[0-9a-f]{40}", parts[i + 2]):
            return parts[i][len("models--"):].replace("--", "/", 1) + "@" + parts[i + 2]
    return None


def pinned_hub_id(spec: str, resolved: str | os.PathLike) -> str:
    """A Hub id given without a revision -> ``owner/name@<commit>`` of the snapshot it was opened
    from (``resolved``), so a recorded command names the exact revision; other specs as given."""
    m = _HUB_ID.match(spec)
    if m is None or m.group(2) or Path(spec).expanduser().exists():
        return spec
    return hub_id_of(resolved) or spec


def _endpoint_reachable(url: str, timeout: float = 3.0) -> bool:
    import socket
    import threading
    from urllib.parse import urlparse

    u = urlparse(url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    th = threading.Thread(target=probe, daemon=True)  # DNS lookups ignore socket timeouts
    th.start()
    th.join(timeout)
    return bool(result and result[0])


BASE_PATTERNS = ["model_index.json", "text_encoder/*", "tokenizer/*", "vae/*", "scheduler/*"]


def hub_pipeline(spec: str) -> Path | None:
    """A Hub id ``owner/name[@revision]`` -> the local snapshot of its pipeline parts other than the
    transformer (text encoder, tokenizer, VAE, scheduler); None when ``spec`` is not a Hub id."""
    if Path(spec).expanduser().exists() or not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        return None
    return _resolve_hub(spec, BASE_PATTERNS)


# --------------------------------------------------------------------------------------------
# entry point


def open(source: str | os.PathLike, *, allow_pickle: bool = False) -> TensorSource:  # noqa: A001
    """Open any checkpoint zopt understands and return a lazy :class:`TensorSource`.

    ``source`` is a diffusers folder (the pipeline folder, its ``transformer/`` or a model folder,
    single or sharded), a single ``.safetensors`` file (original/ComfyUI or diffusers layout), a
    ``.gguf`` file, or a Hub id ``owner/name[@revision]``. Built-in model names are resolved to
    folders before this is called (:func:`zopt.families.resolve_source`).
    Pickle files are refused unless ``allow_pickle`` (then loaded with ``weights_only=True``).
    """
    spec = os.fspath(source)
    path = Path(spec).expanduser()
    if not path.exists():
        if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
            return open(_resolve_hub(spec), allow_pickle=allow_pickle)
        raise SourceNotFound("no such file or folder", path)
    if path.is_dir():
        if (path / "transformer").is_dir():
            return _open_diffusers_folder(path / "transformer")
        return _open_diffusers_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".gguf" or _magic(path) == b"GGUF":
        return GGUFSource(path)
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise PickleRefused(
                "pickle checkpoints can run code when loaded; convert it to safetensors "
                "or pass --allow-pickle (it is then loaded with weights_only=True)",
                path,
            )
        return PickleSource(path)
    if suffix == ".safetensors" or suffix == "":
        src = SafetensorsFile(path)
        try:
            src.config = _read_config(path.parent / "config.json")
        except CorruptFile as e:
            if "not valid JSON" not in str(e):  # an unreadable neighbour is ignored; a bad config is not
                raise
        return src
    raise ZoptError(f"unrecognized checkpoint type {suffix!r} (expected .safetensors, .gguf or a folder)", path)


def _magic(path: Path) -> bytes:
    with validate.open_regular(path) as f:
        return f.read(4)


"""Several variants in one pass over a source (``zopt convert SRC --to gguf:Q8_0,gguf:Q4_K_M,fp8``).

Each format's converter runs in its own thread, unchanged, on a :class:`SharedSource` view: the
first converter to ask for a tensor reads it, the others take the same tensor from a small cache.
The cache holds at most ``budget`` bytes; a converter that runs ahead of the slowest one waits
rather than read more, so the converters stay in step and memory stays bounded (the slowest one
never waits, so all of them finish; a tensor evicted before a converter took it is read again,
and counted). Every check (specs, outputs, options) happens before the source is opened.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..checkpoint import TensorInfo, TensorSource
from ..errors import ZoptError

# the cache: at least this many bytes, and room for a few of the source's largest tensors
MIN_BUDGET = 256 << 20
LARGEST_TENSORS = 6


class SharedSource:
    """One open source shared by ``consumers`` converters; :meth:`view` gives each its own
    TensorSource. ``reads`` counts tensors read from the source, ``rereads`` those read again."""

    def __init__(self, src: TensorSource, consumers: int, budget: int | None = None, on_read=None):
        self.src, self.consumers = src, consumers
        largest = max((src.info(n).nbytes for n in src.names()), default=0)
        self.budget = budget if budget is not None else max(MIN_BUDGET, LARGEST_TENSORS * largest)
        self.on_read = on_read
        self._cond = threading.Condition()
        self._cache: OrderedDict[str, tuple[Any, int, set[int]]] = OrderedDict()  # name -> (tensor, bytes, takers)
        self._bytes = 0
        self._calls = [0] * consumers  # get() calls per consumer: how far along each one is
        self._active = set(range(consumers))
        self._seen: set[str] = set()
        self.reads = self.rereads = 0
        self.peak_bytes = 0
        self._sha: str | None = None
        self._sha_lock = threading.Lock()

    def view(self, who: int) -> TensorSource:
        return _ConsumerView(self, who)

    def sha256(self) -> str:
        with self._sha_lock:  # the converters hash in parallel threads: once is enough
            if self._sha is None:
                self._sha = self.src.sha256()
            return self._sha

    def done(self, who: int) -> None:
        """Consumer ``who`` finished (or failed): it no longer holds the others back."""
        with self._cond:
            self._active.discard(who)
            self._cond.notify_all()

    def get(self, name: str, who: int):
        with self._cond:
            self._calls[who] += 1
            # a converter ahead of the slowest one waits rather than push out a tensor that one
            # still needs (the slowest never waits)
            while name not in self._cache and self._ahead(who) and \
                    self._bytes - self._reclaimable() + self.src.info(name).nbytes > self.budget:
                self._cond.wait(timeout=1.0)
            hit = self._cache.get(name)
            if hit is None:
                t = self.src.get(name)
                self.reads += 1
                if name in self._seen:
                    self.rereads += 1
                else:
                    self._seen.add(name)
                    if self.on_read:
                        self.on_read(self.src.info(name).nbytes)
                hit = (t, self.src.info(name).nbytes, set())
                self._cache[name] = hit
                self._bytes += hit[1]
                self._shrink()
                self.peak_bytes = max(self.peak_bytes, self._bytes)
            hit[2].add(who)
            self._cache.move_to_end(name)
            self._cond.notify_all()
            return hit[0]

    def _ahead(self, who: int) -> bool:
        others = [self._calls[c] for c in self._active if c != who]
        return bool(others) and self._calls[who] > min(others)

    def _taken(self, entry) -> bool:
        return self._active <= entry[2]

    def _reclaimable(self) -> int:
        return sum(e[1] for e in self._cache.values() if self._taken(e))

    def _shrink(self) -> None:
        """Over budget: drop tensors every active converter has taken, oldest first, then (only
        when a converter ran out of step) the oldest of the rest. Entries are kept until then: a
        view asks for a fused qkv tensor once per part."""
        newest = next(reversed(self._cache))
        for n in [n for n, e in self._cache.items() if n != newest and self._taken(e)]:
            if self._bytes <= self.budget:
                return
            self._drop(n)
        while self._bytes > self.budget and len(self._cache) > 1:
            self._drop(next(iter(self._cache)))

    def _drop(self, name: str) -> None:
        _, nbytes, _ = self._cache.pop(name)
        self._bytes -= nbytes


class _ConsumerView(TensorSource):
    """What one converter sees: the source's names, infos and metadata; tensors via the cache."""

    def __init__(self, shared: SharedSource, who: int):
        self._shared, self._who, src = shared, who, shared.src
        self.kind, self.path = src.kind, src.path
        self.metadata = getattr(src, "metadata", {})
        self.config = getattr(src, "config", None)

    def __getattr__(self, name: str) -> Any:  # header (GGUF sources) and the like
        return getattr(self._shared.src, name)

    def names(self) -> list[str]:
        return self._shared.src.names()

    def info(self, name: str) -> TensorInfo:
        return self._shared.src.info(name)

    def get(self, name: str):
        return self._shared.get(name, self._who)

    @property
    def direct(self) -> TensorSource:
        """The source itself, for reads outside the converters' shared pass (the measurement of
        ``gguf:auto`` and the measured recipes reads every tensor ahead of it): neither cached
        nor counted, and it does not move this converter ahead of the others."""
        return self._shared.src

    @property
    def files(self) -> list[Path]:
        return self._shared.src.files

    def sha256(self) -> str:
        return self._shared.sha256()


def split_options(options: dict[str, Any] | None, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each format's share of ``options`` (a key goes to every format that has it); OptionError
    for a key none of ``names`` has."""
    from .options import OptionError, unknown_key_message
    from .registry import option_names

    options = dict(options or {})
    known = {n: set(option_names(n)) for n in names}
    for key in options:
        if not any(key in k for k in known.values()):
            every = tuple(dict.fromkeys(k for n in names for k in sorted(known[n])))
            raise OptionError(unknown_key_message("", key, every, "none of these formats has option"))
    return {n: {k: v for k, v in options.items() if k in known[n]} for n in names}


def convert_many(source: Any, targets: list[tuple[str, str | os.PathLike]], *, options: dict[str, Any] | None = None,
                 progress: bool = True, allow_pickle: bool = False, force: bool = False,
                 budget: int | None = None, loras: list | None = None) -> tuple[list[Path], SharedSource]:
    """Convert ``source`` to every ``(spec, out)`` of ``targets`` in one pass over it.

    Returns the outputs (in ``targets`` order) and the :class:`SharedSource` (its ``reads`` and
    ``rereads`` say how often the source was read). All specs, output paths and options are checked
    before any work; an output that fails leaves nothing behind (each is written atomically) and
    its error is raised once the others finished. ``loras`` are merged once per tensor as the source
    is read, so every variant carries them (see :func:`zopt.formats.convert`).
    """
    from .. import checkpoint
    from ..families import resolve_source
    from ..progress import progress_bar
    from . import convert_open
    from .outputs import check_spec, output_path

    if not targets:
        raise ZoptError("no target formats")
    checked = []
    for spec, out in targets:
        info, sub = check_spec(spec)
        checked.append((spec, info, sub, output_path(info, out, force=force)))
    paths = [c[3] for c in checked]
    dupes = {p for p in paths if paths.count(p) > 1}
    if dupes:
        raise ZoptError("two targets would write the same output", sorted(dupes)[0])
    shares = split_options(options, [c[1].name for c in checked])
    opts = [c[1].parse_options(shares[c[1].name]) for c in checked]
    for (_spec, info, sub, _out), o in zip(checked, opts, strict=True):
        check = getattr(info.load_module(check_needs=False), "check_target", None)
        if check is not None:  # a format's own checks that need no data, before any target starts
            check(sub, o)
    src = checkpoint.open(resolve_source(source), allow_pickle=allow_pickle)
    source_spec = checkpoint.pinned_hub_id(os.fspath(source), src.path)
    if loras:
        from ..lora import merged_source

        src = merged_source(src, list(loras), allow_pickle=allow_pickle)
    total = src.total_bytes()
    results: list[Path | None] = [None] * len(checked)
    errors: list[BaseException | None] = [None] * len(checked)
    label = "convert -> " + ", ".join(c[0] for c in checked)
    with progress_bar(total, label, unit="B", enabled=progress) as bar:
        shared = SharedSource(src, len(checked), budget, on_read=bar.advance)

        def work(i: int) -> None:
            spec, info, sub, out = checked[i]
            try:
                results[i] = convert_open(shared.view(i), source_spec, spec, info, sub, out, opts[i], False,
                                          loras=loras)
            except BaseException as e:  # noqa: BLE001 (re-raised below, after the other targets finished)
                errors[i] = e
            finally:
                shared.done(i)

        threads = [threading.Thread(target=work, args=(i,), name=f"convert-{c[0]}") for i, c in enumerate(checked)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for e in errors:
        if e is not None:
            raise e
    return [r for r in results if r is not None], shared

"""Library quieting: third-party chatter is muted only where zopt asks for it."""

from __future__ import annotations

import logging

from zopt.quiet import quiet_logging


def test_quiet_logging_mutes_warnings_inside_the_block_only(caplog):
    log = logging.getLogger("onnxruntime.quantization")
    with caplog.at_level(logging.INFO):
        with quiet_logging():
            log.warning("per-node advice")
            log.error("a real failure")
        log.warning("after the block")
    assert [r.getMessage() for r in caplog.records] == ["a real failure", "after the block"]

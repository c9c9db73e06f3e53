"""The "Compacted model" section of report.md, from the figures a run's compaction step records.

The renderer lives with the compaction step (``executors.compact_run``), which also prints it for
``admmcompress export --compact``; report may import executors, never the reverse.
"""

from __future__ import annotations

from admmcompress.executors.compact_run import render_compaction

__all__ = ["render_compaction"]

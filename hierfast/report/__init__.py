"""The hierarchy report: figures, the patterns they show, and one self-contained HTML file.

The report takes a plain *analysis dict* (see :mod:`hierfast.report.schema`) so that the
demo, ``hierfast analyze --report`` and ``hierfast report RESULTS`` all render the same way.
"""
from .patterns import check_patterns
from .html import write_report

__all__ = ["check_patterns", "write_report"]

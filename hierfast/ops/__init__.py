"""hierfast.ops: one function per op, dispatched over backends (see hierfast.backends).

Nothing here knows about modules, datasets or reports; nothing above knows which
kernel ran.
"""
from .channel_topk import channel_topk, channel_topk_reference
from .center import center_columns, center_columns_reference
from .gram_epilogue import gram_epilogue, gram_epilogue_reference
from .knn2 import knn2, knn2_reference

__all__ = ["gram_epilogue", "gram_epilogue_reference", "center_columns", "center_columns_reference",
           "channel_topk", "channel_topk_reference", "knn2", "knn2_reference"]

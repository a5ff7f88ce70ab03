"""Merge methods: pure tensor functions, each registered once with a typed parameter spec (spec.py).

One module per family; importing this package registers them all, in this order:
- classic.py: the two- and three-model methods (weighted sum, add difference, sum twice, triple sum);
- soups.py: soups and task arithmetic;
- ties_dare.py: TIES, TIES-SOUP, DARE (linear, TIES), TSD and ComfyUI-DareMerge's two-model DARE merge;
- median.py: geometric median and TGMD;
- stock.py: Model Stock.
common.py holds the parameters and tensor steps several families share. A new method goes in its family's
module with its `@merge_method` declaration; the tab, CLI, API, recipes and live re-merges read it from there.
"""
# the families register their methods on import, in this order (the order of the lists in the tab and CLI)
from . import classic, soups, ties_dare, median, stock  # noqa: E402,F401,I001
from .spec import MAX_MODELS, METHODS, Choice, MethodSpec, Param, get_method, merge_method  # noqa: F401

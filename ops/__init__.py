"""Kernels for the serving hot path: ``paged_attention`` (AOT C++ CPU kernels for MLA/GQA decode
over a paged cache, built with g++ on first use), ``reference`` (the same in plain MindSpore ops)
and ``ascend`` (dispatch to MindSpore's fused Ascend kernels; never imported on CPU paths)."""

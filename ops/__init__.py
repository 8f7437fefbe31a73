"""Kernels for the serving hot path: ``paged_attention`` (AOT C++ CPU kernels for MLA/GQA decode
over a paged cache, and the fused decode steps that add RoPE and the in-place cache write, built
with g++ on first use), ``bf16`` (the bf16 projection kernels), ``reference`` (the decode attention
in plain MindSpore ops) and ``ascend`` (dispatch to MindSpore's fused Ascend kernels; never
imported on CPU paths)."""

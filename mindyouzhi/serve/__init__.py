"""Serving: a continuous-batching engine over a paged KV pool that caches MLA layers as latent +
k_pe (absorbed attention) and GQA layers as K/V, the OpenAI-compatible HTTP server on it, and the
KV-capacity arithmetic.  Entry points: ``engine.Engine``, ``cli`` (generate / serve / capacity).
See docs/serving.md."""

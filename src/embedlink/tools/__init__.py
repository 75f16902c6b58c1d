"""Tools around the library: benchmarks (``bench``, ``vllm_bench``,
``sglang_bench`` and the SGLang test bed), the demo's worker processes
(``workers``) and the generator of the reference docs (``docs``). Nothing in
the library imports them."""

"""medfed's benchmarks: one module per benchmark, each with ``main(argv)``, sharing
:mod:`benchmarks.harness`. Run one with ``medfed bench NAME [--quick]`` or, from the repository
root, ``python -m benchmarks.NAME``."""

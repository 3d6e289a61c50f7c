"""Test tooling, kept out of the installed package: numerical yardsticks (``numerics``), the Hopper
compile gate (``hopper``) and what it compiles for each op (``gate_attention``, ``gate_dino_loss``,
``gate_ema``). Importable as ``tooling`` from the tests (tests/ is on sys.path through its conftest.py)
and from bench scripts that add tests/ to sys.path.
"""

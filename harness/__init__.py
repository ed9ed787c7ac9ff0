"""The paper harness: the experiments that reproduce the paper (Table I/II, Figure 3, the recipes, the
relatedness sweep) and the speed benchmarks, outside the library.

Why apart from ``emm``: no pipeline stage uses them, and they only ever call emm through its public
modules, so the library can be installed, read and imported without them. The import contract
(.importlinter) keeps it one way: ``harness`` imports ``emm``; ``emm`` never imports ``harness``. Its
commands (``emm benchmark``, ``emm relatedness``) join the ``emm`` CLI through the ``emm.commands`` entry
point (``harness.cli:register``), which emm loads without knowing what it is.

- ``params``: its settings, ``harness/benchmark.yaml`` (read beside emm's params.yaml);
- ``experiments``: Table I/II, Figure 3, the recipes and the relatedness sweep;
- ``benchmarks``: the scripts of README "Benchmarks" (``python -m harness.benchmarks.<name>``);
- ``cli``: the two commands.
"""

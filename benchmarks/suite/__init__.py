"""The revnets benchmark suite (``python benchmarks/run.py``; see BENCHMARKS.md).

One module per concern:

* :mod:`.workloads` — what is run: the stacks of residual functions (MLP, Momentum ResNet conv
  blocks, Hamiltonian network, Momentum Transformer encoder) and the model-zoo networks;
* :mod:`.contenders` — how it is run: plain loops, torch checkpoint, ``torch.compile`` with an
  activation memory budget, revnets' modes and budgets, and the PyPI peers (momentumnet, revlib,
  memcnn);
* :mod:`.measure` — timing and memory instruments and their statistics;
* :mod:`.worker` — the process boundary: the peers run in a subprocess of their own environment,
  driven trial by trial so that they stay interleaved with the in-process contenders;
* :mod:`.peers` — creating that environment;
* :mod:`.environment` — hardware, versions, commit, machine load;
* :mod:`.plan` — the sections of a run (targets, sweeps, Pareto curve, batch in a budget, zoo) and
  the quick / full presets;
* :mod:`.report` — the markdown tables, the verdicts on the targets and the plots.
"""

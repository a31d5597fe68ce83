"""The training application behind ``patchdp train / evaluate / plot``, shared by both tasks.

* :mod:`.config` — the YAML config (``task: segmentation`` or ``classification``), every key
  checked from tables before anything is built;
* :mod:`.tasks` — what differs between the tasks (data sets, model, loss, evaluation, metrics);
* :mod:`.loop` — the one training loop (private loader and accountant, checkpoints, budget);
* :mod:`.outputs` — the run folder (config, metrics.csv, privacy report, final metrics).

Layering: imports the plugin and the privacy layer; the CLI (:mod:`patchdp_opacus.commands`)
imports it.
"""

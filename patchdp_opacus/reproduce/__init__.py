"""One command per figure of the paper (``scripts/reproduce.py FIGURE``).

* :mod:`.settings` — the privacy figures' settings (paper C.4/D.1/D.2; lost values chosen and
  marked) and the paper's noise units (its sigma = z * C);
* :mod:`.privacy_figures` — computing (through :mod:`patchdp_opacus.privacy` only), drawing and
  CSV writing of profiles, sweeps and the Gaussian-augmentation comparison;
* :mod:`.figures` — one entry per privacy-only figure;
* :mod:`.training` — what each training figure runs and needs;
* :mod:`.cli` — the command.

Imports only the privacy layer and matplotlib (when drawing): no torch.
"""

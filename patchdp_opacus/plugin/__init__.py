"""Opacus integration: the Theorem-2 accountant, the crop-aware DP data loader, the drop-in
``PrivacyEngine`` and model-compatibility helpers (torch + opacus; builds on
:mod:`patchdp_opacus.privacy`)."""

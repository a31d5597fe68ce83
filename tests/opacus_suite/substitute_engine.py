"""pytest plugin: Opacus' own engine tests with ``opacus.PrivacyEngine`` replaced by ours.

Loaded with ``-p substitute_engine`` (this folder on ``sys.path``) before Opacus' test modules
are imported; they do ``from opacus import PrivacyEngine`` and so get
:class:`patchdp_opacus.PrivacyEngine`, which subclasses the original.  Nothing else of Opacus
is touched.
"""

import opacus

from patchdp_opacus.plugin.engine import PrivacyEngine

assert issubclass(PrivacyEngine, opacus.PrivacyEngine)
opacus.PrivacyEngine = PrivacyEngine

"""The edgepack bundle format, shared by every part and light enough for a Raspberry Pi.

Public modules: :mod:`bundles.keys` (offline key store), :mod:`bundles.trust` (what a verifier trusts),
:mod:`bundles.verify` (verification), :mod:`bundles.assemble` (signing), :mod:`bundles.manifest`,
:mod:`bundles.golden`, :mod:`bundles.selftest`, :mod:`bundles.runtime`, :mod:`bundles.director`
(per-device assignments), :mod:`bundles.preprocessing`, :mod:`bundles.errors`.
Importing this package imports nothing heavy.
"""

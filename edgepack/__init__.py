"""edgepack: build, sign, roll out and serve ML models on edge devices.

This package holds only the version and the unified command line; it must stay
importable without any heavy dependency.
"""

__version__ = "0.1.0"

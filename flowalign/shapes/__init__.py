"""The built-in shapes world (SHAPES_WORLD.md): prompt grammar, renderer and scene verifier.

Submodules are imported explicitly (``from flowalign.shapes.grammar import parse``); this package
imports nothing heavy.
"""

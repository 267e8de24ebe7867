"""Small helpers every layer uses: atomic writes, file hashes, software versions, seeds, thread caps (``io``).

May import: ``errors`` only.
"""

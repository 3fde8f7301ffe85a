"""ConsistentAvatar: temporally, 3D- and emotion-consistent talking-head avatars (MM'24), as a platform.

Read ``DESIGN.md`` for the map. Modules are named after the paper's concepts: :mod:`.tsd`
(Temporally-Sensitive Detail), :mod:`.emotion` (emotion labels, eq. 7), :mod:`.data` (actor sources
and parquet shards), :mod:`.synthetic` (the built-in synthetic actors).
"""

__version__ = "0.1.0"

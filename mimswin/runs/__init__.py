"""Everything a run writes or reads: file layout, atomic I/O, checkpoints, discovery, export, reopening."""

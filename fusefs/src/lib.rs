//! chunkfs: the FUSE filesystem. Not built yet; see ARCHITECTURE.md.

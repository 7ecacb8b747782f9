//! libchunkpreload: the LD_PRELOAD shim. Not built yet; see ARCHITECTURE.md.

//! Minimal transformer (work in progress).

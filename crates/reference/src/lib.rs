//! CPU reference (work in progress).

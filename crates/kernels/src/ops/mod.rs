//! The operations, one module per kernel family. Each has the same three
//! layers: a validated shape, a plan builder (plain Rust, unit-tested), and
//! entry points for [`crate::Device`] buffers, cudarc memory, and raw pointers.

pub mod backward;
pub mod decode;
pub mod feature_map;
pub mod forward;
mod temp;

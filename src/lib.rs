//! linattn facade (work in progress).
pub use linattn_kernels as kernels;
pub use linattn_model as model;
pub use linattn_reference as reference;

//! Hand-written CUDA kernels for linear attention ("Transformers are RNNs",
//! Katharopoulos et al. 2020), with safe Rust wrappers over `cudarc` and a
//! CPU emulator that runs the very same `.cu` sources.
//!
//! The data path reads in one direction: a call's shapes are validated, a
//! [`LaunchPlan`] is built (grid, block, shared memory, a params struct from
//! `cuda/include/linattn/params.h`), and an [`Executor`] runs it: a [`Gpu`]
//! (a CUDA stream) or, with the `emulator` feature, the CPU `Emulator`.
//!
//! Nothing here panics or aborts on a machine without a GPU: a missing driver
//! is [`Error::NoDriver`], a build without nvcc is [`Error::KernelsNotBuilt`].
//!
//! ```
//! use linattn_kernels::{ops::feature_map::{feature_map, RowsShape}, Device, FeatureMap};
//!
//! # fn main() -> Result<(), linattn_kernels::Error> {
//! // The GPU if there is one, else the CPU emulator (when compiled in).
//! let dev = match Device::best_available() {
//!     Ok(dev) => dev,
//!     Err(e) => { eprintln!("skipping: {e}"); return Ok(()); }
//! };
//! let x = dev.upload(&[-1.0f32, 0.0, 2.0, 3.5])?;
//! let mut y = dev.upload(&[f32::NAN; 4])?;
//! match feature_map(&dev, &x, &mut y, &RowsShape::contiguous(2, 2), FeatureMap::EluPlusOne) {
//!     Ok(()) => {
//!         let y = dev.download(&y)?;
//!         assert!((y[0] - (-1.0f32).exp()).abs() < 1e-6 && y[2] == 3.0);
//!     }
//!     // A GPU build without nvcc has no device code: the error says so.
//!     Err(e @ linattn_kernels::Error::KernelsNotBuilt { .. }) => eprintln!("{e}"),
//!     Err(e) => return Err(e),
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod device;
pub mod dtype;
mod embedded;
#[cfg(feature = "emulator")]
mod emu;
mod error;
mod gpu;
pub mod ops;
pub mod params;
#[rustfmt::skip]
mod params_sys;
pub mod plan;

pub use device::{Buffer, Device};
pub use dtype::{DType, Element};
pub use embedded::{build_status, embedded_modules, ptxas_report, BuildStatus, KernelResources};
#[cfg(feature = "emulator")]
pub use emu::Emulator;
pub use error::{Error, Result};
pub use gpu::{device_count, driver_present, DeviceInfo, Gpu};
pub use plan::{Executor, LaunchPlan};

/// Whether this build includes the CPU emulator (feature `emulator`).
pub const EMULATOR_BUILT: bool = cfg!(feature = "emulator");

/// The feature map phi applied to queries and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FeatureMap {
    /// elu(x) + 1: positive everywhere (the paper's default).
    #[default]
    EluPlusOne,
    /// max(x, 0).
    Relu,
    /// The caller already applied a map.
    Identity,
}

impl FeatureMap {
    /// The `LinattnFeatureMap` value the kernels take.
    pub fn to_c(self) -> i32 {
        use params::LinattnFeatureMap as C;
        (match self {
            FeatureMap::EluPlusOne => C::LINATTN_FEATURE_MAP_ELU_PLUS_ONE,
            FeatureMap::Relu => C::LINATTN_FEATURE_MAP_RELU,
            FeatureMap::Identity => C::LINATTN_FEATURE_MAP_IDENTITY,
        }) as i32
    }

    /// phi(x) in f64, the same definition the kernels use (for host-side checks).
    pub fn apply(self, x: f64) -> f64 {
        match self {
            FeatureMap::EluPlusOne => {
                if x > 0.0 {
                    x + 1.0
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => x.max(0.0),
            FeatureMap::Identity => x,
        }
    }
}

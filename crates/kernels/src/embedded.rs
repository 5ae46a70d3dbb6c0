//! What the build script compiled: the embedded fatbins and ptxas's report.

/// Whether the device code was compiled into this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    /// Fatbins with SASS for `archs` and PTX for `ptx_arch` are embedded.
    Built {
        /// Compute capabilities with SASS (80 = sm_80).
        archs: &'static [u32],
        /// The compute capability whose PTX is embedded for JIT on newer GPUs.
        ptx_arch: u32,
        /// nvcc's version line.
        nvcc: &'static str,
    },
    /// No device code: the reason, from the build script.
    NotBuilt(&'static str),
}

impl BuildStatus {
    /// "sm_80, sm_90 + compute_80 PTX", or "not built".
    pub fn archs_string(&self) -> String {
        match self {
            BuildStatus::Built {
                archs, ptx_arch, ..
            } => {
                let sass: Vec<String> = archs.iter().map(|a| format!("sm_{a}")).collect();
                format!("{} + compute_{ptx_arch} PTX", sass.join(", "))
            }
            BuildStatus::NotBuilt(_) => "not built".into(),
        }
    }
}

/// One kernel's resources on one architecture, from `ptxas -v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelResources {
    /// The `.cu` module.
    pub module: &'static str,
    /// The kernel symbol.
    pub kernel: &'static str,
    /// The architecture (`sm_90`).
    pub arch: &'static str,
    /// Registers per thread.
    pub registers: u32,
    /// Stack frame bytes per thread.
    pub stack_bytes: u32,
    /// Bytes of register spill stores.
    pub spill_store_bytes: u32,
    /// Bytes of register spill loads.
    pub spill_load_bytes: u32,
    /// Static shared memory bytes per block.
    pub static_smem_bytes: u32,
}

include!(concat!(env!("OUT_DIR"), "/embedded.rs"));

/// How the device code of this build was compiled.
pub fn build_status() -> BuildStatus {
    BUILD_STATUS
}

/// ptxas's resource report for every kernel and architecture (empty when not built).
pub fn ptxas_report() -> &'static [KernelResources] {
    PTXAS_REPORT
}

/// The embedded fatbin of a module, if it was built.
pub(crate) fn embedded_module(name: &str) -> Option<&'static [u8]> {
    EMBEDDED_MODULES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
}

/// Names of the embedded modules.
pub fn embedded_modules() -> impl Iterator<Item = &'static str> {
    EMBEDDED_MODULES.iter().map(|(n, _)| *n)
}

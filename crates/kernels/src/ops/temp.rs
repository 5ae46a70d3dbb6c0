//! Memory one forward or backward call allocates for itself: the varlen
//! offsets (copied from the host) and the fp32 workspace. The workspace is
//! zeroed where it lives, never copied: uploading a host vector of zeros
//! crossed PCIe (~25 GB/s) on every call, e.g. 6.3 MB (~0.25 ms) for the
//! backward at the first anchor shape, next to a ~0.74 ms HBM floor.

use cudarc::driver::{CudaSlice, DevicePtr};

use crate::{Device, Error, Gpu, Result};

/// Kept alive until the call's launches are enqueued, then dropped (a GPU
/// allocation is freed in stream order, after the kernels that use it).
pub enum Temp {
    None,
    #[allow(dead_code)]
    HostWords(Vec<i64>),
    #[allow(dead_code)]
    HostFloats(Vec<f32>),
    #[allow(dead_code)]
    CudaWords(CudaSlice<i64>),
    #[allow(dead_code)]
    CudaFloats(CudaSlice<f32>),
}

fn address<T>(g: &Gpu, s: &CudaSlice<T>) -> u64 {
    let (p, guard) = s.device_ptr(g.stream());
    drop(guard);
    p
}

/// The varlen offsets on `dev` (address 0 for a dense call).
pub(crate) fn offsets(dev: &Device, cu: &[i64], kernel: &'static str) -> Result<(Temp, u64)> {
    if cu.is_empty() {
        return Ok((Temp::None, 0));
    }
    match dev {
        Device::Gpu(g) => offsets_cuda(g, cu, kernel),
        #[cfg(feature = "emulator")]
        Device::Emulator(_) => {
            let v = cu.to_vec();
            let p = v.as_ptr() as u64;
            Ok((Temp::HostWords(v), p))
        }
    }
}

/// [`offsets`] on a [`Gpu`]'s stream.
pub(crate) fn offsets_cuda(g: &Gpu, cu: &[i64], kernel: &'static str) -> Result<(Temp, u64)> {
    if cu.is_empty() {
        return Ok((Temp::None, 0));
    }
    let s = g
        .stream()
        .clone_htod(cu)
        .map_err(|e| Error::driver(format!("cuMemcpyHtoD ({kernel}: cu_seqlens)"), e))?;
    let p = address(g, &s);
    Ok((Temp::CudaWords(s), p))
}

/// A zeroed fp32 workspace of `floats` elements on `dev` (address 0 if none).
pub(crate) fn workspace(dev: &Device, floats: usize, kernel: &'static str) -> Result<(Temp, u64)> {
    if floats == 0 {
        return Ok((Temp::None, 0));
    }
    match dev {
        Device::Gpu(g) => workspace_cuda(g, floats, kernel),
        #[cfg(feature = "emulator")]
        Device::Emulator(_) => {
            let v = vec![0f32; floats];
            let p = v.as_ptr() as u64;
            Ok((Temp::HostFloats(v), p))
        }
    }
}

/// [`workspace`] on a [`Gpu`]'s stream: allocated and memset there.
pub(crate) fn workspace_cuda(g: &Gpu, floats: usize, kernel: &'static str) -> Result<(Temp, u64)> {
    if floats == 0 {
        return Ok((Temp::None, 0));
    }
    let s = g.stream().alloc_zeros::<f32>(floats).map_err(|e| {
        Error::driver(
            format!("cuMemAlloc + cuMemset ({kernel}: workspace of {floats} fp32)"),
            e,
        )
    })?;
    let p = address(g, &s);
    Ok((Temp::CudaFloats(s), p))
}

//! One handle for "where kernels run" and one buffer type for "where memory
//! lives", so tests, the model and quick experiments can be written once for
//! the GPU and the CPU emulator. Engines that own their memory use the
//! cudarc-typed or raw-pointer entry points instead.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, SyncOnDrop};

use crate::dtype::Element;
use crate::params::KernelParams;
use crate::plan::{Executor, LaunchPlan};
use crate::{Error, Gpu, Result};

/// Where kernels run.
#[derive(Debug, Clone)]
pub enum Device {
    /// A CUDA device and stream.
    Gpu(Arc<Gpu>),
    /// The CPU emulator running the same `.cu` sources (feature `emulator`).
    #[cfg(feature = "emulator")]
    Emulator(Arc<crate::Emulator>),
}

/// Memory of a [`Device`]: device memory for a GPU, host memory for the emulator.
#[derive(Debug)]
pub enum Buffer<T> {
    /// Host memory (emulator).
    Host(Vec<T>),
    /// Device memory (GPU).
    Cuda(CudaSlice<T>),
}

/// Keeps cudarc's stream-ordering guard alive until the launch is enqueued.
pub(crate) struct PtrGuard<'a>(#[allow(dead_code)] Option<SyncOnDrop<'a>>);

impl Device {
    /// The first GPU if a driver and device are present, else the emulator
    /// when compiled in; the error says why neither is available.
    ///
    /// A GPU without device code in this build (no nvcc at build time) is
    /// passed over for the emulator, since it could run nothing.
    pub fn best_available() -> Result<Self> {
        let gpu = match crate::build_status() {
            crate::BuildStatus::Built { .. } => Gpu::new(0),
            crate::BuildStatus::NotBuilt(reason) => Err(Error::KernelsNotBuilt { reason }),
        };
        match gpu {
            Ok(g) => Ok(Device::Gpu(Arc::new(g))),
            #[cfg(feature = "emulator")]
            Err(_) => Ok(Device::Emulator(Arc::new(crate::Emulator::new()?))),
            #[cfg(not(feature = "emulator"))]
            Err(e) => Err(e),
        }
    }

    /// A short name for logs: the GPU's name or "CPU emulator".
    pub fn describe(&self) -> String {
        match self {
            Device::Gpu(g) => format!(
                "{} (sm_{}{})",
                g.info().name,
                g.info().compute_capability.0,
                g.info().compute_capability.1
            ),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => "CPU emulator".into(),
        }
    }

    /// Copies host data to this device.
    pub fn upload<T: Element>(&self, data: &[T]) -> Result<Buffer<T>> {
        match self {
            Device::Gpu(g) => g
                .stream()
                .clone_htod(data)
                .map(Buffer::Cuda)
                .map_err(|e| Error::driver("cuMemcpyHtoD", e)),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => Ok(Buffer::Host(data.to_vec())),
        }
    }

    /// Copies a buffer back to the host (synchronising the stream).
    pub fn download<T: Element>(&self, buf: &Buffer<T>) -> Result<Vec<T>> {
        match (self, buf) {
            (Device::Gpu(g), Buffer::Cuda(s)) => g
                .stream()
                .clone_dtoh(s)
                .map_err(|e| Error::driver("cuMemcpyDtoH", e)),
            #[cfg(feature = "emulator")]
            (Device::Emulator(_), Buffer::Host(v)) => Ok(v.clone()),
            _ => Err(Error::invalid(
                "download",
                "buf",
                "the buffer belongs to a different kind of device",
            )),
        }
    }

    /// Waits for all queued work (a no-op on the emulator, which runs synchronously).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Gpu(g) => g.synchronize(),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => Ok(()),
        }
    }
}

impl<T: Element> Buffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Buffer::Host(v) => v.len(),
            Buffer::Cuda(s) => cudarc::driver::DeviceSlice::len(s),
        }
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn read_ptr<'a>(
        &'a self,
        dev: &'a Device,
        kernel: &'static str,
        arg: &'static str,
    ) -> Result<(u64, PtrGuard<'a>)> {
        match (dev, self) {
            (Device::Gpu(g), Buffer::Cuda(s)) => {
                let (p, guard) = s.device_ptr(g.stream());
                Ok((p, PtrGuard(Some(guard))))
            }
            #[cfg(feature = "emulator")]
            (Device::Emulator(_), Buffer::Host(v)) => Ok((v.as_ptr() as u64, PtrGuard(None))),
            _ => Err(Error::invalid(
                kernel,
                arg,
                "the buffer lives on a different kind of device than the one launching",
            )),
        }
    }

    pub(crate) fn write_ptr<'a>(
        &'a mut self,
        dev: &'a Device,
        kernel: &'static str,
        arg: &'static str,
    ) -> Result<(u64, PtrGuard<'a>)> {
        match (dev, self) {
            (Device::Gpu(g), Buffer::Cuda(s)) => {
                let (p, guard) = s.device_ptr_mut(g.stream());
                Ok((p, PtrGuard(Some(guard))))
            }
            #[cfg(feature = "emulator")]
            (Device::Emulator(_), Buffer::Host(v)) => Ok((v.as_mut_ptr() as u64, PtrGuard(None))),
            _ => Err(Error::invalid(
                kernel,
                arg,
                "the buffer lives on a different kind of device than the one launching",
            )),
        }
    }
}

impl Executor for Device {
    unsafe fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> Result<()> {
        match self {
            // SAFETY: forwarded contract.
            Device::Gpu(g) => unsafe { g.launch(plan) },
            #[cfg(feature = "emulator")]
            Device::Emulator(e) => unsafe { e.launch(plan) },
        }
    }

    unsafe fn launch_writing<P: KernelParams>(
        &self,
        plan: &LaunchPlan<P>,
        writes: &[(u64, usize)],
    ) -> Result<()> {
        match self {
            // SAFETY: forwarded contract.
            Device::Gpu(g) => unsafe { g.launch_writing(plan, writes) },
            #[cfg(feature = "emulator")]
            Device::Emulator(e) => unsafe { e.launch_writing(plan, writes) },
        }
    }
}

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

/// An empty `CudaSlice` on `g`'s stream. The driver refuses `cuMemAlloc(0)`
/// (cudarc's `alloc(0)` and `null()` both ask for it), so this allocates one
/// element and hands cudarc the address with length 0: the slice frees it
/// when dropped and no kernel ever touches it.
fn empty_cuda<T: Element>(g: &Gpu) -> Result<CudaSlice<T>> {
    let st = g.stream();
    crate::gpu::guarded("an empty buffer", || {
        let one = st
            .alloc_zeros::<T>(1)
            .map_err(|e| Error::driver("cuMemAlloc (the backing of an empty buffer)", e))?;
        let ptr = one.leak();
        // SAFETY: `ptr` is a live allocation of this stream's context that
        // nothing else owns (leaked above); the new slice takes it over and
        // frees it on drop, and its length 0 lets no copy or kernel touch it.
        Ok(unsafe { st.upgrade_device_ptr(ptr, 0) })
    })
}

/// Keeps cudarc's stream-ordering guard alive until the launch is enqueued.
pub struct PtrGuard<'a>(#[allow(dead_code)] Option<SyncOnDrop<'a>>);

impl<'a> PtrGuard<'a> {
    /// Keeps `guard` until this is dropped.
    pub(crate) fn new(guard: SyncOnDrop<'a>) -> Self {
        PtrGuard(Some(guard))
    }
}

impl Device {
    /// The first GPU if a driver and a supported device (compute capability
    /// 8.0 or newer) are present, else the emulator when compiled in; the
    /// error says why neither is available.
    ///
    /// A GPU without device code in this build (no nvcc at build time), or
    /// one too old to run it ([`Error::UnsupportedDevice`]), is passed over
    /// for the emulator, since it could run nothing.
    pub fn best_available() -> Result<Self> {
        let gpu = match crate::build_status() {
            crate::BuildStatus::Built { .. } => Gpu::new(0),
            crate::BuildStatus::NotBuilt(reason) => Err(Error::KernelsNotBuilt { reason }),
        };
        choose(gpu, fallback)
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

    /// Copies host data to this device. An empty slice gives an empty
    /// buffer on every device (on a GPU without asking the driver for zero
    /// bytes, which `cuMemAlloc` refuses).
    pub fn upload<T: Element>(&self, data: &[T]) -> Result<Buffer<T>> {
        match self {
            Device::Gpu(g) if data.is_empty() => empty_cuda(g).map(Buffer::Cuda),
            Device::Gpu(g) => g
                .stream()
                .clone_htod(data)
                .map(Buffer::Cuda)
                .map_err(|e| Error::driver("cuMemcpyHtoD", e)),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => Ok(Buffer::Host(data.to_vec())),
        }
    }

    /// A buffer of `len` zeros on this device (set where it lives: no host
    /// copy crosses the bus). `len` 0 gives an empty buffer on every device.
    pub fn alloc_zeros<T: Element>(&self, len: usize) -> Result<Buffer<T>> {
        match self {
            Device::Gpu(g) if len == 0 => empty_cuda(g).map(Buffer::Cuda),
            Device::Gpu(g) => g
                .stream()
                .alloc_zeros::<T>(len)
                .map(Buffer::Cuda)
                .map_err(|e| Error::driver(format!("cuMemAlloc + cuMemset ({len} elements)"), e)),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => Ok(Buffer::Host(vec![bytemuck::Zeroable::zeroed(); len])),
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

/// The emulator, when compiled in, for [`Device::best_available`].
#[cfg(feature = "emulator")]
fn fallback(_why: Error) -> Result<Device> {
    Ok(Device::Emulator(Arc::new(crate::Emulator::new()?)))
}

/// Without the emulator there is nothing to fall back on: the GPU's error.
#[cfg(not(feature = "emulator"))]
fn fallback(why: Error) -> Result<Device> {
    Err(why)
}

/// The decision of [`Device::best_available`], apart from opening devices:
/// a usable GPU wins; any reason it is unusable (no driver, no device, no
/// device code, compute capability below 8.0) goes to `fallback`.
fn choose(gpu: Result<Gpu>, fallback: impl FnOnce(Error) -> Result<Device>) -> Result<Device> {
    match gpu {
        Ok(g) => Ok(Device::Gpu(Arc::new(g))),
        Err(e) => fallback(e),
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
    fn target(&self) -> crate::Target {
        match self {
            Device::Gpu(g) => g.target(),
            #[cfg(feature = "emulator")]
            Device::Emulator(e) => e.target(),
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn too_old() -> Result<Gpu> {
        Err(crate::target::check_compute_capability(0, "Tesla T4", (7, 5)).unwrap_err())
    }

    /// An sm_75 GPU (or no GPU, or no device code) is passed over: the
    /// fallback gets the reason, and with the emulator compiled in, that is
    /// what `best_available` gives.
    #[test]
    fn an_unusable_gpu_falls_back() {
        let mut seen = None;
        let r = choose(too_old(), |e| {
            seen = Some(e.to_string());
            Err(Error::EmulatorNotBuilt)
        });
        assert!(matches!(r, Err(Error::EmulatorNotBuilt)), "{r:?}");
        let seen = seen.expect("the fallback was not asked");
        assert!(seen.contains("Tesla T4") && seen.contains("7.5"), "{seen}");
        let r = choose(Err(Error::NoDriver), fallback);
        #[cfg(feature = "emulator")]
        assert!(matches!(r, Ok(Device::Emulator(_))), "{r:?}");
        #[cfg(not(feature = "emulator"))]
        assert!(matches!(r, Err(Error::NoDriver)), "{r:?}");
        let r = choose(too_old(), fallback);
        #[cfg(feature = "emulator")]
        assert!(matches!(r, Ok(Device::Emulator(_))), "{r:?}");
        #[cfg(not(feature = "emulator"))]
        assert!(matches!(r, Err(Error::UnsupportedDevice { .. })), "{r:?}");
    }

    /// Empty uploads and zero-filled buffers of any length work on every
    /// device `best_available` gives (on a GPU without `cuMemAlloc(0)`).
    #[test]
    fn empty_and_zeroed_buffers() {
        let Ok(dev) = Device::best_available() else {
            eprintln!("no device: skipped");
            return;
        };
        let e = dev.upload::<f32>(&[]).unwrap();
        assert!(e.is_empty());
        assert_eq!(dev.download(&e).unwrap(), Vec::<f32>::new());
        let z = dev.alloc_zeros::<half::bf16>(0).unwrap();
        assert_eq!(z.len(), 0);
        let z = dev.alloc_zeros::<f32>(5).unwrap();
        assert_eq!(dev.download(&z).unwrap(), vec![0f32; 5]);
    }
}

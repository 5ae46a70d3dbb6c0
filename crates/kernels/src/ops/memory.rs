//! How an entry point turns typed memory into device addresses, once for
//! every op: an executor that owns memory ([`Memory`]: a [`Device`] with its
//! [`Buffer`]s, or a [`Gpu`] with cudarc memory) and the arguments it
//! accepts ([`DeviceRead`], [`DeviceWrite`]). Each yields an address plus
//! the guard that keeps cudarc's stream ordering until the launch is
//! enqueued; the op then builds its raw-address struct and takes the same
//! path as its `*_raw` entry point.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::attention::{StateMut, StateRef};
use super::temp::{self, Temp};
use crate::device::PtrGuard;
use crate::plan::Executor;
use crate::{Buffer, Device, Gpu, Result};

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::Device {}
    impl Sealed for crate::Gpu {}
}

/// An executor whose entry points take typed memory: a [`Device`] (with
/// [`Buffer`]s) or a [`Gpu`] (with cudarc slices and views). Sealed.
pub trait Memory: Executor + sealed::Sealed {
    /// The varlen offsets copied to this executor (address 0 for a dense call).
    #[doc(hidden)]
    fn offsets(&self, cu: &[i64], kernel: &'static str) -> Result<(Temp, u64)>;
    /// A zeroed fp32 workspace of `floats` elements (address 0 if none).
    #[doc(hidden)]
    fn workspace(&self, floats: usize, kernel: &'static str) -> Result<(Temp, u64)>;
}

impl Memory for Device {
    fn offsets(&self, cu: &[i64], kernel: &'static str) -> Result<(Temp, u64)> {
        temp::offsets(self, cu, kernel)
    }
    fn workspace(&self, floats: usize, kernel: &'static str) -> Result<(Temp, u64)> {
        temp::workspace(self, floats, kernel)
    }
}

impl Memory for Gpu {
    fn offsets(&self, cu: &[i64], kernel: &'static str) -> Result<(Temp, u64)> {
        temp::offsets_cuda(self, cu, kernel)
    }
    fn workspace(&self, floats: usize, kernel: &'static str) -> Result<(Temp, u64)> {
        temp::workspace_cuda(self, floats, kernel)
    }
}

/// Memory of `T` elements that executor `E` can read: a [`Buffer<T>`] on a
/// [`Device`], any cudarc [`DevicePtr<T>`] (a `CudaSlice` or a view) on a
/// [`Gpu`].
pub trait DeviceRead<T, E: Memory> {
    /// Elements.
    fn elems(&self) -> usize;
    /// The address, and the guard that orders cudarc's streams around the
    /// launch (kept until it is enqueued). Errors when the memory belongs
    /// to another kind of device.
    #[doc(hidden)]
    fn read_addr<'a>(
        &'a self,
        exec: &'a E,
        kernel: &'static str,
        arg: &'static str,
    ) -> Result<(u64, PtrGuard<'a>)>;
}

/// Memory of `T` elements that executor `E` can write (see [`DeviceRead`]).
pub trait DeviceWrite<T, E: Memory>: DeviceRead<T, E> {
    /// [`DeviceRead::read_addr`] for writing.
    #[doc(hidden)]
    fn write_addr<'a>(
        &'a mut self,
        exec: &'a E,
        kernel: &'static str,
        arg: &'static str,
    ) -> Result<(u64, PtrGuard<'a>)>;
}

impl<T: crate::Element> DeviceRead<T, Device> for Buffer<T> {
    fn elems(&self) -> usize {
        self.len()
    }
    fn read_addr<'a>(
        &'a self,
        dev: &'a Device,
        kernel: &'static str,
        arg: &'static str,
    ) -> Result<(u64, PtrGuard<'a>)> {
        self.read_ptr(dev, kernel, arg)
    }
}

impl<T: crate::Element> DeviceWrite<T, Device> for Buffer<T> {
    fn write_addr<'a>(
        &'a mut self,
        dev: &'a Device,
        kernel: &'static str,
        arg: &'static str,
    ) -> Result<(u64, PtrGuard<'a>)> {
        self.write_ptr(dev, kernel, arg)
    }
}

impl<T, S: DevicePtr<T>> DeviceRead<T, Gpu> for S {
    fn elems(&self) -> usize {
        self.len()
    }
    fn read_addr<'a>(
        &'a self,
        gpu: &'a Gpu,
        _kernel: &'static str,
        _arg: &'static str,
    ) -> Result<(u64, PtrGuard<'a>)> {
        let (p, guard) = self.device_ptr(gpu.stream());
        Ok((p, PtrGuard::new(guard)))
    }
}

impl<T, S: DevicePtrMut<T> + DevicePtr<T>> DeviceWrite<T, Gpu> for S {
    fn write_addr<'a>(
        &'a mut self,
        gpu: &'a Gpu,
        _kernel: &'static str,
        _arg: &'static str,
    ) -> Result<(u64, PtrGuard<'a>)> {
        let (p, guard) = self.device_ptr_mut(gpu.stream());
        Ok((p, PtrGuard::new(guard)))
    }
}

/// Addresses gathered for one call, with the guards that must outlive the
/// launches.
pub(crate) struct Addrs<'a, E: Memory> {
    exec: &'a E,
    kernel: &'static str,
    guards: Vec<PtrGuard<'a>>,
}

impl<'a, E: Memory> Addrs<'a, E> {
    pub(crate) fn new(exec: &'a E, kernel: &'static str) -> Self {
        Addrs {
            exec,
            kernel,
            guards: Vec::new(),
        }
    }

    /// The address of an input.
    pub(crate) fn read<T, B: DeviceRead<T, E> + ?Sized>(
        &mut self,
        b: &'a B,
        arg: &'static str,
    ) -> Result<u64> {
        let (p, g) = b.read_addr(self.exec, self.kernel, arg)?;
        self.guards.push(g);
        Ok(p)
    }

    /// The address of an output.
    pub(crate) fn write<T, B: DeviceWrite<T, E> + ?Sized>(
        &mut self,
        b: &'a mut B,
        arg: &'static str,
    ) -> Result<u64> {
        let (p, g) = b.write_addr(self.exec, self.kernel, arg)?;
        self.guards.push(g);
        Ok(p)
    }

    /// The addresses of an optional read-only state (0, 0 when absent).
    pub(crate) fn state<B: DeviceRead<f32, E>>(
        &mut self,
        st: Option<&StateRef<'a, B>>,
        args: [&'static str; 2],
    ) -> Result<(u64, u64)> {
        match st {
            None => Ok((0, 0)),
            Some(st) => Ok((self.read(st.s, args[0])?, self.read(st.z, args[1])?)),
        }
    }

    /// The addresses of an optional written state (0, 0 when absent).
    pub(crate) fn state_mut<B: DeviceWrite<f32, E>>(
        &mut self,
        st: Option<StateMut<'a, B>>,
        args: [&'static str; 2],
    ) -> Result<(u64, u64)> {
        match st {
            None => Ok((0, 0)),
            Some(st) => Ok((self.write(st.s, args[0])?, self.write(st.z, args[1])?)),
        }
    }
}

//! The NCCL [`Collective`] (feature `nccl`): cudarc's `nccl` module, which
//! loads libnccl at run time, so building needs no NCCL and a machine
//! without it gets [`Error::InvalidArgument`] from the constructors instead
//! of a panic.

use std::sync::Arc;

use cudarc::nccl::{Comm, Id};

use super::driver::Collective;
use crate::{Buffer, Device, Error, Gpu, Result};

const OP: &str = "NcclCollective";

/// An all-gather over an NCCL communicator whose stream is the rank's
/// [`Gpu`] stream, so the collective is ordered with the kernels around it
/// without any synchronisation.
pub struct NcclCollective {
    comm: Comm,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a
// time (NCCL's thread-safety rule); `NcclCollective` is not `Sync`, so
// moving it to the thread that drives its GPU keeps that rule. cudarc's
// `Comm` holds a raw pointer and so is not `Send` by itself.
unsafe impl Send for NcclCollective {}

fn nccl_error(what: &str, e: cudarc::nccl::result::NcclError) -> Error {
    Error::driver(format!("NCCL {what}"), format!("{:?}", e.0))
}

impl NcclCollective {
    /// Whether libnccl (`libnccl.so.2` or `libnccl.so`) loads on this
    /// machine and exports `ncclGetUniqueId`. Probed here rather than with
    /// cudarc's `is_culib_present`, which exists only when cudarc loads
    /// libraries at run time (not under candle's dynamic linking).
    pub fn available() -> bool {
        static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *PRESENT.get_or_init(|| {
            ["libnccl.so.2", "libnccl.so"].into_iter().any(|name| {
                // SAFETY: loading libnccl runs only its initialisers; the
                // symbol is looked up, never called.
                unsafe {
                    libloading::Library::new(name)
                        .map(|lib| {
                            lib.get::<unsafe extern "C" fn()>(b"ncclGetUniqueId\0")
                                .is_ok()
                        })
                        .unwrap_or(false)
                }
            })
        })
    }

    fn check_available() -> Result<()> {
        if !Self::available() {
            return Err(Error::invalid(
                OP,
                "libnccl",
                "NCCL could not be loaded (no libnccl.so.2 on the library path)",
            ));
        }
        Ok(())
    }

    /// Wraps a communicator the engine built (e.g. [`Comm::from_rank`] with
    /// an [`Id`] it distributed itself). Its stream must be the stream of
    /// the [`Gpu`] whose [`Device`] is passed to every call (checked there).
    pub fn new(comm: Comm) -> Self {
        NcclCollective { comm }
    }

    /// A new unique id for [`Comm::from_rank`] (rank 0 makes it and sends
    /// its bytes, [`Id::internal`], to the others).
    /// Errors: no NCCL, or NCCL's own error.
    pub fn unique_id() -> Result<Id> {
        Self::check_available()?;
        Id::new().map_err(|e| nccl_error("ncclGetUniqueId", e))
    }

    /// Rank `rank` of `ranks` on `gpu`'s stream, joining the group `id`
    /// names (blocks until every rank has joined).
    /// Errors: rank out of range, no NCCL, or NCCL's own error.
    pub fn from_rank(gpu: &Gpu, rank: usize, ranks: usize, id: Id) -> Result<Self> {
        if rank >= ranks || ranks > i32::MAX as usize {
            return Err(Error::invalid(
                OP,
                "rank",
                format!("rank {rank} of {ranks}: expected 0 <= rank < ranks"),
            ));
        }
        Self::check_available()?;
        let comm = Comm::from_rank(gpu.stream().clone(), rank, ranks, id)
            .map_err(|e| nccl_error("ncclCommInitRank", e))?;
        Ok(NcclCollective { comm })
    }

    /// One communicator per GPU of this process (rank i on `gpus[i]`), from
    /// one thread (`ncclCommInitAll`); hand each to the thread driving its GPU.
    /// Errors: no GPU given, no NCCL, or NCCL's own error.
    pub fn for_gpus(gpus: &[Arc<Gpu>]) -> Result<Vec<Self>> {
        if gpus.is_empty() {
            return Err(Error::invalid(OP, "gpus", "at least one GPU"));
        }
        Self::check_available()?;
        let streams = gpus.iter().map(|g| g.stream().clone()).collect();
        let comms = Comm::from_devices(streams).map_err(|e| nccl_error("ncclCommInitAll", e))?;
        Ok(comms
            .into_iter()
            .map(|comm| NcclCollective { comm })
            .collect())
    }

    /// The communicator.
    pub fn comm(&self) -> &Comm {
        &self.comm
    }
}

impl Collective for NcclCollective {
    fn check(&self, dev: &Device) -> Result<()> {
        let Device::Gpu(g) = dev else {
            return Err(Error::invalid(
                "all_gather",
                "dev",
                "NCCL needs a GPU device",
            ));
        };
        if !Arc::ptr_eq(g.stream(), &self.comm.stream()) {
            return Err(Error::invalid(
                "all_gather",
                "dev",
                "the communicator's stream is not this GPU's stream",
            ));
        }
        Ok(())
    }

    /// Through the communicator's own stream, whatever `dev` is.
    fn all_gather_host(&self, _dev: &Device, send: &[f32]) -> Result<Vec<f32>> {
        let stream = self.comm.stream();
        let drv = |what: &str, e: cudarc::driver::DriverError| {
            Error::driver(what.to_string(), format!("{e:?}"))
        };
        let s = stream
            .clone_htod(send)
            .map_err(|e| drv("descriptor upload", e))?;
        let mut r = stream
            .alloc_zeros::<f32>(send.len() * self.ranks())
            .map_err(|e| drv("descriptor alloc", e))?;
        self.comm
            .all_gather(&s, &mut r)
            .map_err(|e| nccl_error("ncclAllGather", e))?;
        stream
            .clone_dtoh(&r)
            .map_err(|e| drv("descriptor download", e))
    }

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn ranks(&self) -> usize {
        self.comm.world_size()
    }

    fn all_gather(&self, dev: &Device, send: &Buffer<f32>, recv: &mut Buffer<f32>) -> Result<()> {
        let n = send.len();
        if recv.len() != self.ranks() * n {
            return Err(Error::invalid(
                "all_gather",
                "recv",
                format!(
                    "expected {} x {n} = {} fp32 elements, found {}",
                    self.ranks(),
                    self.ranks() * n,
                    recv.len()
                ),
            ));
        }
        self.check(dev)?;
        match (send, recv) {
            (Buffer::Cuda(s), Buffer::Cuda(r)) => {
                if n == 0 {
                    return Ok(());
                }
                self.comm
                    .all_gather(s, r)
                    .map(|_| ())
                    .map_err(|e| nccl_error("ncclAllGather", e))
            }
            _ => Err(Error::invalid(
                "all_gather",
                "send",
                "NCCL needs device memory (Buffer::Cuda)",
            )),
        }
    }
}

//! NCCL collectives over the GPUs of one host, all driven by one host thread: a communicator
//! per rank, made together over the ranks' streams, and the two collectives the
//! tensor-parallel forward pass needs: the all-reduce that sums the row-parallel partials.
//!
//! A collective returns only once every rank has joined it, so one thread issuing the ranks'
//! calls one after another would wait on the first for ever. Every collective here is
//! therefore issued for all ranks inside one NCCL group (`ncclGroupStart` … `ncclGroupEnd`),
//! which queues the calls and launches them together at the end.
//!
//! A group of one rank makes no communicator and never calls NCCL (its all-reduce does
//! nothing), so the one-GPU path needs no libnccl.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::{group_end, group_start, Comm, ReduceOp};

use crate::KernelError;

/// NCCL's switch for NVLink SHARP (NVLS), its in-switch reduction over NVLink. NVLS works on
/// CUDA multicast objects, which shared and virtualized multi-GPU hosts often do not permit,
/// and an all-reduce of one layer's activations gains little from it. NCCL would pick NVLS by
/// itself on NVSwitch systems (H100/H200 boards), so kvq forces it off, whatever the caller's
/// environment says, before any communicator is made (NCCL reads it then).
pub const NVLS_ENV: &str = "NCCL_NVLS_ENABLE";

/// True when libnccl can be loaded (no call is made into it). cudarc looks it up as
/// `libnccl.so` (or `libnccl.so.<CUDA major>`); an installation with only `libnccl.so.2`
/// (the pip wheels) needs a `libnccl.so` link to it on the library path.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// The ranks of a tensor-parallel group, one GPU each, rank `r` on `streams[r]`.
#[derive(Debug)]
pub struct TpGroup {
    streams: Vec<Arc<CudaStream>>,
    /// One per rank, in rank order; empty for a group of one or one sharing a device.
    comms: Vec<Comm>,
    /// Every rank on the same GPU (see [`TpGroup::new`]).
    shared_device: bool,
}

// SAFETY: NCCL communicators may be used from any thread as long as no two threads use one at
// the same time. `TpGroup` is not `Sync`, so only the thread that owns it issues collectives.
unsafe impl Send for TpGroup {}

impl TpGroup {
    /// A group whose rank `r` runs on `streams[r]`, each on a device of its own. With two or
    /// more ranks this forces [`NVLS_ENV`] to 0 and makes the communicators
    /// (`ncclCommInitAll`); with one it touches neither.
    ///
    /// Ranks that all share one GPU make a group without NCCL whose all-reduce sums through
    /// the host: slow, but it runs the split model's every other piece on a one-GPU machine,
    /// which is how the split is tested there. Some but not all ranks sharing a device is an
    /// error.
    pub fn new(streams: Vec<Arc<CudaStream>>) -> Result<Self, KernelError> {
        if streams.is_empty() {
            return Err(KernelError::InvalidArgument(
                "a tensor-parallel group needs at least one stream".into(),
            ));
        }
        let ordinals: Vec<usize> = streams.iter().map(|s| s.context().ordinal()).collect();
        if streams.len() > 1 && ordinals.iter().all(|&o| o == ordinals[0]) {
            return Ok(Self {
                streams,
                comms: Vec::new(),
                shared_device: true,
            });
        }
        for (r, d) in ordinals.iter().enumerate() {
            if let Some(first) = ordinals[..r].iter().position(|e| e == d) {
                return Err(KernelError::InvalidArgument(format!(
                    "tensor-parallel ranks {first} and {r} are both on device {d}; each rank \
                     needs a GPU of its own"
                )));
            }
        }
        if streams.len() == 1 {
            return Ok(Self {
                streams,
                comms: Vec::new(),
                shared_device: false,
            });
        }
        std::env::set_var(NVLS_ENV, "0");
        if !nccl_available() {
            return Err(KernelError::LibraryMissing(
                "libnccl (looked up as libnccl.so; link it to libnccl.so.2)",
            ));
        }
        let comms = Comm::from_devices(streams.clone())
            .map_err(|e| nccl_error("making the communicators (ncclCommInitAll)", None, e))?;
        Ok(Self {
            streams,
            comms,
            shared_device: false,
        })
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.streams.len()
    }

    /// Rank `rank`'s stream, where its collectives run.
    pub fn stream(&self, rank: usize) -> &Arc<CudaStream> {
        &self.streams[rank]
    }

    /// Sums the first `len` elements of every rank's buffer over the ranks, in place: on
    /// return (in stream order) each `bufs[r][..len]` holds the sum. `bufs[r]` must be on rank
    /// `r`'s device and ordered before this call on rank `r`'s stream.
    pub fn all_reduce_sum_f32(
        &self,
        bufs: &mut [&mut CudaSlice<f32>],
        len: usize,
    ) -> Result<(), KernelError> {
        const OP: &str = "all-reduce";
        self.check(OP, "buffer", bufs.iter().map(|b| &**b), len)?;
        if self.shared_device && len > 0 {
            return self.sum_through_host(bufs, len);
        }
        if self.comms.is_empty() || len == 0 {
            return Ok(());
        }
        self.grouped(OP, |rank, comm| {
            let mut view = bufs[rank].slice_mut(..len);
            comm.all_reduce_in_place(&mut view, &ReduceOp::Sum)
                .map(drop)
        })?;
        self.mark_written(bufs);
        Ok(())
    }

    /// The all-reduce of ranks sharing one GPU: every buffer to the host, summed in rank order,
    /// and back.
    fn sum_through_host(
        &self,
        bufs: &mut [&mut CudaSlice<f32>],
        len: usize,
    ) -> Result<(), KernelError> {
        let stream = &self.streams[0];
        let copy = |e| KernelError::driver("all-reduce through the host (ranks sharing a GPU)", e);
        let mut sum = vec![0f32; len];
        for b in bufs.iter() {
            let part = stream.clone_dtoh(&b.slice(..len)).map_err(copy)?;
            sum.iter_mut().zip(part).for_each(|(s, x)| *s += x);
        }
        for b in bufs.iter_mut() {
            stream
                .memcpy_htod(&sum, &mut b.slice_mut(..len))
                .map_err(copy)?;
        }
        Ok(())
    }

    /// Checks there is one buffer per rank, on the rank's device, of at least `len` elements.
    fn check<'a>(
        &self,
        op: &str,
        what: &str,
        bufs: impl ExactSizeIterator<Item = &'a CudaSlice<f32>>,
        len: usize,
    ) -> Result<(), KernelError> {
        if bufs.len() != self.size() {
            return Err(KernelError::InvalidArgument(format!(
                "{op}: {} {what}s for a group of {} ranks",
                bufs.len(),
                self.size()
            )));
        }
        for (rank, (b, s)) in bufs.zip(&self.streams).enumerate() {
            let device = s.context().ordinal();
            if b.len() < len {
                return Err(KernelError::InvalidArgument(format!(
                    "{op}: rank {rank}'s {what} holds {} elements, {len} needed",
                    b.len()
                )));
            }
            if b.ordinal() != device {
                return Err(KernelError::InvalidArgument(format!(
                    "{op}: rank {rank}'s {what} is on device {}, the rank on device {device}",
                    b.ordinal()
                )));
            }
        }
        Ok(())
    }

    /// Issues `issue(rank, comm)` for every rank inside one NCCL group and returns the first
    /// failure, naming its rank. The group is closed even then: NCCL keeps the group's state
    /// per thread, and an unclosed group would swallow the next collective.
    fn grouped(
        &self,
        op: &str,
        mut issue: impl FnMut(usize, &Comm) -> Result<(), NcclError>,
    ) -> Result<(), KernelError> {
        group_start().map_err(|e| nccl_error(op, None, e))?;
        let failed = self.comms.iter().enumerate().find_map(|(rank, comm)| {
            issue(rank, comm)
                .err()
                .map(|e| nccl_error(op, Some(rank), e))
        });
        let end = group_end();
        if let Some(e) = failed {
            return Err(e);
        }
        end.map(drop).map_err(|e| nccl_error(op, None, e))
    }

    /// The collectives were queued inside the group and launched only at its end, after the
    /// per-call stream events were recorded; touching the buffers again on their ranks'
    /// streams records them after the launch, for contexts that track events across streams.
    fn mark_written(&self, bufs: &mut [&mut CudaSlice<f32>]) {
        for (b, s) in bufs.iter_mut().zip(&self.streams) {
            let (_, _record) = b.device_ptr_mut(s);
        }
    }
}

/// An NCCL failure as a [`KernelError`] naming the operation and, when one rank's call
/// failed, the rank.
fn nccl_error(op: &str, rank: Option<usize>, e: NcclError) -> KernelError {
    let op = match rank {
        Some(r) => format!("NCCL {op} (rank {r})"),
        None => format!("NCCL {op}"),
    };
    KernelError::Driver {
        op,
        reason: format!("{:?}", e.0),
    }
}

#[cfg(test)]
mod tests {
    use cudarc::driver::CudaContext;

    use super::*;

    /// One stream per visible GPU, or `None` (with a message) when there are fewer than `min`.
    fn streams(min: usize) -> Option<Vec<Arc<CudaStream>>> {
        let n = if crate::device::driver_available() {
            CudaContext::device_count().unwrap_or(0) as usize
        } else {
            0
        };
        if n < min {
            eprintln!("skipping: {n} CUDA device(s) visible, this test needs {min}");
            return None;
        }
        Some(
            (0..n)
                .map(|i| CudaContext::new(i).expect("CUDA context").default_stream())
                .collect(),
        )
    }

    /// Every rank all-reduces `[rank + 1; LEN]`; checks each rank's sums.
    fn run(streams: Vec<Arc<CudaStream>>) {
        const LEN: usize = 1000;
        let n = streams.len();
        let group = TpGroup::new(streams.clone()).expect("TpGroup");
        let mut bufs: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(r, s)| s.clone_htod(&vec![(r + 1) as f32; LEN]).unwrap())
            .collect();
        let mut refs: Vec<_> = bufs.iter_mut().collect();
        group
            .all_reduce_sum_f32(&mut refs, LEN)
            .expect("all-reduce");
        let want = (n * (n + 1) / 2) as f32;
        for (r, (s, b)) in streams.iter().zip(&bufs).enumerate() {
            let got = s.clone_dtoh(b).unwrap();
            assert!(got.iter().all(|&x| x == want), "rank {r}: {:?}", &got[..4]);
        }
    }

    #[test]
    #[ignore = "needs CUDA GPUs"]
    fn all_reduce_over_every_gpu() {
        if let Some(streams) = streams(2) {
            run(streams);
            assert_eq!(std::env::var(NVLS_ENV).as_deref(), Ok("0"));
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn a_group_of_one_needs_no_nccl() {
        if let Some(streams) = streams(1) {
            run(streams[..1].to_vec());
        }
    }
}

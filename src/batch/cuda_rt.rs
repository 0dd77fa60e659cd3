//! The few CUDA runtime calls the engine needs that tch does not offer: a
//! copy stream of its own, and events. With them a batch's upload runs on
//! the copy engine while the GPU computes the batch before it, instead of
//! queueing behind that batch's kernels on libtorch's default stream, and
//! the compute thread queues a batch before it waits for the one before.
//! Both are experimental and off unless [`Overlap::get`] says otherwise.
//!
//! The functions are looked up in the running process, where libtorch's
//! CUDA library has loaded the runtime; nothing is linked. Where they are
//! not found (a libtorch without CUDA, or one that hides its runtime), the
//! engine uploads on the default stream as libtorch does.
//!
//! libtorch runs every kernel of the engine on the device's legacy default
//! stream (stream 0; tch never sets another). The copy stream is created
//! non-blocking, so that it does not wait for stream 0, nor stream 0 for
//! it: the order between them is only what the events say.

use std::ffi::{c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use tch::Tensor;

use crate::error::{Error, Result};

type Status = c_int;
type Handle = *mut c_void;

/// `cudaStreamNonBlocking`.
const STREAM_NON_BLOCKING: c_uint = 0x01;
/// `cudaEventDisableTiming`.
const EVENT_DISABLE_TIMING: c_uint = 0x02;
/// `cudaMemcpyHostToDevice`.
const HOST_TO_DEVICE: c_int = 1;

struct Api {
    set_device: unsafe extern "C" fn(c_int) -> Status,
    stream_create: unsafe extern "C" fn(*mut Handle, c_uint) -> Status,
    stream_destroy: unsafe extern "C" fn(Handle) -> Status,
    stream_synchronize: unsafe extern "C" fn(Handle) -> Status,
    event_create: unsafe extern "C" fn(*mut Handle, c_uint) -> Status,
    event_destroy: unsafe extern "C" fn(Handle) -> Status,
    event_record: unsafe extern "C" fn(Handle, Handle) -> Status,
    event_synchronize: unsafe extern "C" fn(Handle) -> Status,
    stream_wait_event: unsafe extern "C" fn(Handle, Handle, c_uint) -> Status,
    memcpy_async: unsafe extern "C" fn(*mut c_void, *const c_void, usize, c_int, Handle) -> Status,
    device_synchronize: unsafe extern "C" fn() -> Status,
}

/// The function `name` of the process, as the function pointer type `F`.
///
/// # Safety
/// `F` must be the C signature of the symbol `name`.
unsafe fn find<F: Copy>(name: &CStr) -> Option<F> {
    // SAFETY: dlsym with RTLD_DEFAULT only reads the process's loaded
    // symbol tables; `name` is NUL-terminated.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    // SAFETY: a function pointer has a data pointer's size; the caller
    // vouches for the signature.
    (!p.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

/// The runtime's functions, once looked up; `None` where one is missing.
fn api() -> Option<&'static Api> {
    static API: OnceLock<Option<Api>> = OnceLock::new();
    API.get_or_init(|| {
        // SAFETY (each call): the field's type is the C signature of the
        // CUDA runtime's function of that name.
        unsafe {
            Some(Api {
                set_device: find(c"cudaSetDevice")?,
                stream_create: find(c"cudaStreamCreateWithFlags")?,
                stream_destroy: find(c"cudaStreamDestroy")?,
                stream_synchronize: find(c"cudaStreamSynchronize")?,
                event_create: find(c"cudaEventCreateWithFlags")?,
                event_destroy: find(c"cudaEventDestroy")?,
                event_record: find(c"cudaEventRecord")?,
                event_synchronize: find(c"cudaEventSynchronize")?,
                stream_wait_event: find(c"cudaStreamWaitEvent")?,
                memcpy_async: find(c"cudaMemcpyAsync")?,
                device_synchronize: find(c"cudaDeviceSynchronize")?,
            })
        }
    })
    .as_ref()
}

/// Waits for all work on CUDA device `device`, every stream's (the
/// engine's copy stream's too), as `cudaDeviceSynchronize`; an error (a
/// sticky device error) is returned, not a panic as libtorch's own
/// synchronisation through tch gives. Without the runtime's functions the
/// engine has no copies of its own to wait for: `Ok`.
pub(crate) fn device_synchronize(device: usize) -> Result<()> {
    let Some(api) = api() else {
        return Ok(());
    };
    set_device(api, device as c_int)?;
    // SAFETY: no arguments; the runtime's own state.
    check("cudaDeviceSynchronize", unsafe {
        (api.device_synchronize)()
    })
}

/// Waits for all work on CUDA device `device`: [`device_synchronize`]
/// where the runtime's functions are found (an error, not a panic, on a
/// device error), else libtorch's synchronisation through tch.
pub(crate) fn synchronize_device(device: usize) -> Result<()> {
    if api().is_some() {
        device_synchronize(device)
    } else {
        tch::Cuda::synchronize(device as i64);
        Ok(())
    }
}

fn check(call: &str, status: Status) -> Result<()> {
    if status == 0 {
        Ok(())
    } else {
        Err(Error::Internal {
            what: format!("the CUDA runtime's {call} failed with error {status}"),
        })
    }
}

/// The engine's CUDA overlaps, experimental and off by default: named in
/// the environment variable `TCH_VIS_CUDA_OVERLAP`, a comma-separated
/// list of `copy` (uploads on the engine's copy stream) and `queue` (each
/// batch queued on the device before the compute thread waits for the
/// one before it), or `1` for both.
///
/// On H100s both together ran resnet50 saliency up to 12% faster past
/// the first batch in fp16 and bf16, though not in every pair of runs. The
/// writer threads' slowdown once blamed on them came in runs without them
/// too (writer system time: the disk's). One fp32 run with them wrote two
/// batches' maps of other images. The likely cause, device twins made
/// while stream-0 work could still write their memory, is fixed (see
/// `Staging::twin` in the engine) but not yet checked on a GPU: they stay
/// off until it is (BENCHMARKS.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Overlap {
    pub(crate) copy: bool,
    pub(crate) queue: bool,
}

impl Overlap {
    /// The process's setting, read once.
    pub(crate) fn get() -> Overlap {
        static OVERLAP: OnceLock<Overlap> = OnceLock::new();
        *OVERLAP.get_or_init(|| {
            Overlap::parse(&std::env::var("TCH_VIS_CUDA_OVERLAP").unwrap_or_default())
        })
    }

    /// `copy`, `queue`, both comma-separated, or `1` for both; anything
    /// else names nothing.
    fn parse(value: &str) -> Overlap {
        let mut on = Overlap::default();
        for part in value.split(',').map(str::trim) {
            match part {
                "copy" => on.copy = true,
                "queue" => on.queue = true,
                "1" => {
                    on.copy = true;
                    on.queue = true;
                }
                _ => {}
            }
        }
        on
    }
}

/// Makes `device` the calling thread's current CUDA device, which the
/// runtime's calls (streams, events, stream 0) refer to; libtorch's own
/// operations set it for themselves and put it back. `false` without the
/// runtime or on failure.
pub(crate) fn use_device(device: usize) -> bool {
    match (api(), c_int::try_from(device)) {
        (Some(api), Ok(d)) => set_device(api, d).is_ok(),
        _ => false,
    }
}

/// [`use_device`] with the runtime's functions and a device number in
/// hand.
fn set_device(api: &Api, device: c_int) -> Result<()> {
    // SAFETY: a plain runtime call on this thread.
    check("cudaSetDevice", unsafe { (api.set_device)(device) })
}

/// A non-blocking stream of the calling thread's current device,
/// destroyed when dropped (after the work queued on it).
pub(crate) struct CopyStream {
    api: &'static Api,
    handle: Handle,
    device: c_int,
}

// SAFETY: a stream handle may be used from any thread of the process.
unsafe impl Send for CopyStream {}

impl CopyStream {
    /// A copy stream on `device`, made the calling thread's current
    /// device; `None` without the runtime or when it cannot be made.
    pub(crate) fn new(device: usize) -> Option<CopyStream> {
        let (api, device) = (api()?, c_int::try_from(device).ok()?);
        set_device(api, device).ok()?;
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer.
        let status = unsafe { (api.stream_create)(&mut handle, STREAM_NON_BLOCKING) };
        (status == 0).then_some(CopyStream {
            api,
            handle,
            device,
        })
    }

    /// Queues the copy of the host tensor `src` into the device tensor
    /// `dst` on this stream, and returns the event of its end. Both must be
    /// contiguous, of the same kind and shape; `src` must be pinned, and
    /// neither may be written, freed or (for `dst`) read until the event.
    pub(crate) fn upload(&self, src: &Tensor, dst: &Tensor) -> Result<Event> {
        let bytes = src.numel() * src.kind().elt_size_in_bytes();
        if !src.is_contiguous()
            || !dst.is_contiguous()
            || src.kind() != dst.kind()
            || src.size() != dst.size()
            || src.device().is_cuda()
            || !dst.device().is_cuda()
        {
            return Err(Error::Internal {
                what: "an upload between tensors of different layouts".into(),
            });
        }
        // SAFETY: both pointers address `bytes` bytes of live tensors
        // checked above; the caller keeps them alive and untouched until
        // the returned event.
        check("cudaMemcpyAsync", unsafe {
            (self.api.memcpy_async)(
                dst.data_ptr(),
                src.data_ptr(),
                bytes,
                HOST_TO_DEVICE,
                self.handle,
            )
        })?;
        Event::record(self.api, self.handle, self.device).inspect_err(|_| {
            // Nothing will wait for the copy: it ends before the tensors
            // can be freed.
            self.synchronize();
        })
    }

    fn synchronize(&self) {
        // SAFETY: a live stream.
        unsafe {
            (self.api.stream_synchronize)(self.handle);
        }
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        self.synchronize();
        // SAFETY: the handle was created by `new` and is destroyed once.
        unsafe {
            (self.api.stream_destroy)(self.handle);
        }
    }
}

/// A recorded event: the point of a stream's queue it marks, on the
/// device `device`.
pub(crate) struct Event {
    api: &'static Api,
    handle: Handle,
    device: c_int,
}

// SAFETY: an event handle may be used from any thread of the process.
unsafe impl Send for Event {}

impl Event {
    /// Records an event on `stream` (null: stream 0) of `device`, which
    /// becomes the calling thread's current device.
    fn record(api: &'static Api, stream: Handle, device: c_int) -> Result<Event> {
        set_device(api, device)?;
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer.
        check("cudaEventCreateWithFlags", unsafe {
            (api.event_create)(&mut handle, EVENT_DISABLE_TIMING)
        })?;
        let event = Event {
            api,
            handle,
            device,
        };
        // SAFETY: a live event, and a live stream (or stream 0).
        check("cudaEventRecord", unsafe {
            (api.event_record)(handle, stream)
        })?;
        Ok(event)
    }

    /// The event of everything queued so far on `device`'s stream 0;
    /// `None` without the runtime (or for a device number it cannot name).
    pub(crate) fn on_default_stream(device: usize) -> Option<Result<Event>> {
        let (api, device) = (api()?, c_int::try_from(device).ok()?);
        Some(Event::record(api, std::ptr::null_mut(), device))
    }

    /// Makes the work queued on stream 0 of the event's device from now on
    /// (by any thread) wait for this event, without blocking the calling
    /// thread. (Stream 0 is the calling thread's current device's: the
    /// device is set first, whatever libtorch's own calls left current.)
    pub(crate) fn wait_on_default_stream(&self) -> Result<()> {
        set_device(self.api, self.device)?;
        // SAFETY: a live, recorded event; stream 0.
        check("cudaStreamWaitEvent", unsafe {
            (self.api.stream_wait_event)(std::ptr::null_mut(), self.handle, 0)
        })
    }

    /// Blocks the calling thread until the event.
    pub(crate) fn synchronize(&self) -> Result<()> {
        // SAFETY: a live, recorded event.
        check("cudaEventSynchronize", unsafe {
            (self.api.event_synchronize)(self.handle)
        })
    }
}

/// An event that what holds it must not outlive unfinished: dropped while
/// it still holds the event, it blocks until the event (what is dropped
/// after it may be memory the device still uses: declare it after this).
pub(crate) struct Awaited(Option<Event>);

impl Awaited {
    pub(crate) fn new(event: Option<Event>) -> Awaited {
        Awaited(event)
    }

    /// The event, if one is still held.
    pub(crate) fn get(&self) -> Option<&Event> {
        self.0.as_ref()
    }

    /// Blocks until the event, if one is still held; then holds none.
    pub(crate) fn synchronize(&mut self) -> Result<()> {
        match self.0.take() {
            Some(event) => event.synchronize(),
            None => Ok(()),
        }
    }

    /// Lets the event go without waiting for it (the work after it is
    /// ordered after it on the device).
    pub(crate) fn release(&mut self) {
        self.0 = None;
    }
}

impl Drop for Awaited {
    fn drop(&mut self) {
        let _ = self.synchronize();
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `record` and is destroyed once
        // (the runtime frees it once the event has completed).
        unsafe {
            (self.api.event_destroy)(self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    #[test]
    fn overlaps_are_named_in_a_list() {
        use super::Overlap;
        let both = Overlap {
            copy: true,
            queue: true,
        };
        assert_eq!(Overlap::parse(""), Overlap::default());
        assert_eq!(Overlap::parse("0"), Overlap::default());
        assert_eq!(Overlap::parse("1"), both);
        assert_eq!(Overlap::parse("copy, queue"), both);
        assert_eq!(
            Overlap::parse("queue"),
            Overlap {
                copy: false,
                queue: true
            }
        );
        assert_eq!(
            Overlap::parse("copy,bogus"),
            Overlap {
                copy: true,
                queue: false
            }
        );
    }

    /// On a machine without CUDA there is no copy stream (a CUDA libtorch
    /// has the runtime, but no device to make it on). With CUDA there is
    /// one, and a pinned tensor copied on it reaches the device whole:
    /// stream 0, told to wait for the copy's event, sees every value.
    #[test]
    fn the_copy_stream_uploads_what_stream_0_then_reads() {
        let Some(stream) = super::CopyStream::new(0) else {
            assert!(!tch::Cuda::is_available(), "CUDA without a copy stream");
            return;
        };
        let device = Device::Cuda(0);
        let host = Tensor::arange(3 * 1024 * 1024, (Kind::Float, Device::Cpu)).pin_memory(device);
        let dev = Tensor::zeros([3 * 1024 * 1024], (Kind::Float, device));
        assert!(super::use_device(0));
        let done = stream.upload(&host, &dev).unwrap();
        done.wait_on_default_stream().unwrap();
        let back = dev.to_device(Device::Cpu);
        assert!(back.equal(&host));
        // Layouts that differ are refused.
        let other = Tensor::zeros([7], (Kind::Float, device));
        assert!(stream.upload(&host, &other).is_err());
    }
}

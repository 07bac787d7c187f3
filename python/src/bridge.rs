//! Rust futures as asyncio awaitables, run on the event loop's own thread.
//!
//! One [`Bridge`] per event loop (the Python package keeps them in a `WeakKeyDictionary` keyed
//! by the loop) and a queue of jobs. [`spawn`] polls a future once at once, on the calling (loop)
//! thread; a future that is ready then becomes a [`Ready`] awaitable (awaiting it does not yield
//! to the loop), one that has to wait becomes an `asyncio.Future` of the loop. Its waker, called
//! from whichever thread (a tokio worker, usually), queues a poll job and wakes the loop if it was
//! not woken yet; the loop then calls [`Bridge::run`], which runs the queued jobs: each polls its
//! future again, with the GIL and the tokio runtime's context, and sets the asyncio future's
//! result when it is ready. No tokio thread ever waits for the GIL.
//!
//! The loop is woken one of two ways ([`Bridge::new`]'s `relay`):
//! - **socket pair** (Unix, the default): the waker writes one byte to a Unix socket pair whose
//!   reading end the loop watches with `loop.add_reader`; nothing but the loop takes the GIL;
//! - **relay thread** (Windows, whose asyncio loops have no `add_reader`, and any loop without
//!   it): the waker signals a thread of the bridge's own, which takes the GIL and asks the loop
//!   to run the queued jobs with `loop.call_soon_threadsafe`. The thread ends with the bridge, or
//!   when the loop is closed or gone.
//!
//! Cancelling the asyncio future (its task was cancelled, or `asyncio.wait_for` timed out) drops
//! the Rust future, which cancels whatever it was doing; the futures handed to [`spawn`] are
//! written to be cancel-safe where that matters (a reply's next event is not lost).

use std::future::Future;
#[cfg(unix)]
use std::io::{Read, Write};
#[cfg(unix)]
use std::os::fd::AsRawFd;
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};

use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::BoundObject;

use crate::errors::{Failure, IntoPyResult};

/// What a future hands back: a closure that makes the Python result once the GIL is held.
pub type Output = Box<dyn for<'py> FnOnce(Python<'py>) -> PyResult<Py<PyAny>> + Send>;

/// A future to run on the loop.
pub type BoxFuture = Pin<Box<dyn Future<Output = Output> + Send>>;

type Job = Box<dyn for<'py> FnOnce(Python<'py>) + Send>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An [`Output`] of a value that converts to Python.
pub fn output<T>(value: T) -> Output
where
    T: for<'py> IntoPyObject<'py> + Send + 'static,
{
    Box::new(move |py| {
        value
            .into_pyobject(py)
            .map(|b| b.into_any().unbind())
            .map_err(Into::into)
    })
}

/// An [`Output`] of `None`.
pub fn none() -> Output {
    Box::new(|py| Ok(py.None()))
}

/// An [`Output`] that raises `failure`.
pub fn fail(failure: Failure) -> Output {
    Box::new(move |py| Err(failure.into_pyerr(py)))
}

/// How a [`Bridge`] wakes its loop (see the module docs).
enum Signal {
    /// A byte written to `writer`; the loop watches `reader`.
    #[cfg(unix)]
    Socket {
        reader: UnixStream,
        writer: UnixStream,
    },
    /// A signal to the relay thread, which calls the loop's `call_soon_threadsafe`. The sender
    /// goes with the bridge, and with it the thread.
    Relay(Sender<()>),
}

/// The shared state of a [`Bridge`]: what wakers hold.
pub struct Inner {
    /// `weakref.ref(loop)`: the bridge does not keep its loop alive.
    event_loop: Py<PyAny>,
    signal: Signal,
    jobs: Mutex<Vec<Job>>,
    signaled: AtomicBool,
}

impl Inner {
    /// Queues `job` to run on the loop's thread; wakes the loop if it was not woken yet.
    pub fn post(&self, job: Job) {
        lock(&self.jobs).push(job);
        if !self.signaled.swap(true, Ordering::AcqRel) {
            match &self.signal {
                // A full socket buffer means a wake-up is pending already.
                #[cfg(unix)]
                Signal::Socket { writer, .. } => {
                    let _ = (&*writer).write(&[1]);
                }
                // A relay that ended (its loop is closed) has nothing left to wake.
                Signal::Relay(tx) => {
                    let _ = tx.send(());
                }
            }
        }
    }

    /// Runs the queued jobs, on the loop's thread.
    fn run_jobs(&self, py: Python<'_>) {
        // Cleared before the queue is taken: a job posted after this wakes the loop again.
        self.signaled.store(false, Ordering::Release);
        let jobs = std::mem::take(&mut *lock(&self.jobs));
        for job in jobs {
            job(py);
        }
    }

    /// The loop, if it still exists.
    pub fn event_loop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let l = self.event_loop.bind(py).call0()?;
        if l.is_none() {
            return Err(Failure::closed("the event loop is gone").into_pyerr(py));
        }
        Ok(l)
    }
}

/// The bridge between one asyncio event loop and the futures of this module (see the module
/// docs). Made by the Python package, which registers `loop.add_reader(bridge.fileno(),
/// bridge.run)` for a socket-pair bridge.
#[pyclass(module = "unimic._native", frozen)]
pub struct Bridge {
    pub(crate) inner: Arc<Inner>,
}

/// The relay thread: each signal (and those that came with it) becomes one
/// `loop.call_soon_threadsafe(RunJobs)`, with the GIL, until the bridge is dropped (the channel
/// closes) or its loop is closed or gone.
fn relay(rx: Receiver<()>, inner: Weak<Inner>) {
    while rx.recv().is_ok() {
        while rx.try_recv().is_ok() {}
        // `None`: the interpreter is shutting down; nothing is left to wake.
        let go_on = Python::try_attach(|py| {
            let Some(inner) = inner.upgrade() else {
                return false;
            };
            let Ok(event_loop) = inner.event_loop(py) else {
                return false;
            };
            let closed = event_loop
                .call_method0("is_closed")
                .and_then(|c| c.is_truthy())
                .unwrap_or(true);
            // A loop closed between the check and the call raises: the relay ends then too.
            !closed
                && event_loop
                    .call_method1(
                        "call_soon_threadsafe",
                        (RunJobs {
                            inner: Arc::downgrade(&inner),
                        },),
                    )
                    .is_ok()
        });
        if go_on != Some(true) {
            break;
        }
    }
}

/// What the relay asks the loop to call: the bridge's [`Inner::run_jobs`].
#[pyclass(module = "unimic._native", frozen)]
struct RunJobs {
    inner: Weak<Inner>,
}

#[pymethods]
impl RunJobs {
    fn __call__(&self, py: Python<'_>) {
        if let Some(inner) = self.inner.upgrade() {
            inner.run_jobs(py);
        }
    }
}

#[pymethods]
impl Bridge {
    /// A bridge for `event_loop`. With `relay`, the loop is woken by a thread of the bridge's
    /// own (through `call_soon_threadsafe`); without it, by a socket pair the loop watches (Unix
    /// only).
    #[new]
    #[pyo3(signature = (event_loop, relay=false))]
    fn new(py: Python<'_>, event_loop: Bound<'_, PyAny>, relay: bool) -> PyResult<Self> {
        let weak = py
            .import("weakref")?
            .getattr("ref")?
            .call1((event_loop,))?
            .unbind();
        let (signal, rx) = if relay {
            let (tx, rx) = channel();
            (Signal::Relay(tx), Some(rx))
        } else {
            (socket_signal()?, None)
        };
        let inner = Arc::new(Inner {
            event_loop: weak,
            signal,
            jobs: Mutex::new(Vec::new()),
            signaled: AtomicBool::new(false),
        });
        if let Some(rx) = rx {
            let weak_inner = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("unimic-relay".into())
                .spawn(move || self::relay(rx, weak_inner))?;
        }
        Ok(Self { inner })
    }

    /// The file descriptor the loop watches for reading; `None` for a relay bridge.
    fn fileno(&self) -> Option<i64> {
        match &self.inner.signal {
            #[cfg(unix)]
            Signal::Socket { reader, .. } => Some(i64::from(reader.as_raw_fd())),
            Signal::Relay(_) => None,
        }
    }

    /// Runs the queued jobs (the loop calls this when the descriptor is readable).
    fn run(&self, py: Python<'_>) {
        #[cfg(unix)]
        if let Signal::Socket { reader, .. } = &self.inner.signal {
            let mut buf = [0u8; 64];
            while let Ok(n) = (&*reader).read(&mut buf) {
                if n < buf.len() {
                    break;
                }
            }
        }
        self.inner.run_jobs(py);
    }

    /// Jobs waiting to run (for tests).
    fn pending(&self) -> usize {
        lock(&self.inner.jobs).len()
    }
}

/// The socket pair of a bridge without a relay.
#[cfg(unix)]
fn socket_signal() -> PyResult<Signal> {
    let (reader, writer) = UnixStream::pair()?;
    reader.set_nonblocking(true)?;
    writer.set_nonblocking(true)?;
    Ok(Signal::Socket { reader, writer })
}

/// Without Unix socket pairs, a bridge needs a relay.
#[cfg(not(unix))]
fn socket_signal() -> PyResult<Signal> {
    Err(pyo3::exceptions::PyValueError::new_err(
        "this platform has no socket-pair bridge: give a relay",
    ))
}

/// One future being run for Python.
struct Task {
    future: Mutex<Option<BoxFuture>>,
    bridge: Arc<Inner>,
    /// The asyncio future the result goes to (set once the first poll was pending; taken, with
    /// the GIL, once it is resolved or cancelled, so that no thread without the GIL drops it:
    /// a Python reference dropped there is released only later, and this one keeps the loop
    /// alive).
    py_future: Mutex<Option<Py<PyAny>>>,
    scheduled: AtomicBool,
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            let task = self.clone();
            self.bridge.post(Box::new(move |py| task.run(py)));
        }
    }
}

impl Task {
    /// Polls the future once (with the runtime's context); its output when it is ready.
    fn poll(self: &Arc<Self>) -> Option<Output> {
        let mut slot = lock(&self.future);
        let future = slot.as_mut()?;
        let waker = Waker::from(self.clone());
        let _runtime = crate::runtime::get().ok().map(|rt| rt.enter());
        match future.as_mut().poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(out) => {
                *slot = None;
                Some(out)
            }
            Poll::Pending => None,
        }
    }

    /// The poll job: polls again unless the asyncio future was cancelled, and hands a ready
    /// result to it.
    fn run(self: Arc<Self>, py: Python<'_>) {
        self.scheduled.store(false, Ordering::Release);
        let Some(py_future) = lock(&self.py_future).as_ref().map(|f| f.clone_ref(py)) else {
            return;
        };
        let py_future = py_future.bind(py);
        if py_future
            .call_method0("done")
            .and_then(|d| d.is_truthy())
            .unwrap_or(true)
        {
            // Cancelled: nothing awaits the result any more.
            drop(lock(&self.future).take());
            drop(lock(&self.py_future).take());
            return;
        }
        if let Some(out) = self.poll() {
            drop(lock(&self.py_future).take());
            let r = match out(py) {
                Ok(v) => py_future.call_method1("set_result", (v,)),
                Err(e) => py_future.call_method1("set_exception", (e.value(py),)),
            };
            if let Err(e) = r {
                e.write_unraisable(py, Some(py_future));
            }
        }
    }
}

/// Called by asyncio when the future of a [`Task`] is done: a cancelled one drops the Rust
/// future (and so cancels it).
#[pyclass(module = "unimic._native", frozen)]
struct OnDone {
    task: Weak<Task>,
}

#[pymethods]
impl OnDone {
    fn __call__(&self, future: Bound<'_, PyAny>) -> PyResult<()> {
        if future.call_method0("cancelled")?.is_truthy()? {
            if let Some(task) = self.task.upgrade() {
                drop(lock(&task.future).take());
                drop(lock(&task.py_future).take());
            }
        }
        Ok(())
    }
}

/// An awaitable whose result is already known: `await` returns it (or raises it) without
/// yielding to the loop.
#[pyclass(module = "unimic._native", frozen)]
pub struct Ready {
    value: Mutex<Option<PyResult<Py<PyAny>>>>,
}

#[pymethods]
impl Ready {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match lock(&self.value).take() {
            Some(Ok(v)) => Err(PyStopIteration::new_err((v,))),
            Some(Err(e)) => Err(e),
            None => Err(PyStopIteration::new_err((py.None(),))),
        }
    }

    fn send(&self, py: Python<'_>, _value: Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.__next__(py)
    }

    #[pyo3(signature = (typ, val=None, tb=None))]
    fn throw(
        &self,
        typ: Bound<'_, PyAny>,
        val: Option<Bound<'_, PyAny>>,
        tb: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let _ = tb;
        let exc = match val {
            Some(v) if !v.is_none() => v,
            _ => typ,
        };
        Err(PyErr::from_value(exc))
    }

    fn close(&self) {
        lock(&self.value).take();
    }
}

/// Runs `future` for Python on the loop of `bridge`: an awaitable of its output.
pub fn spawn<'py>(
    py: Python<'py>,
    bridge: &Bridge,
    future: impl Future<Output = Output> + Send + 'static,
) -> PyResult<Bound<'py, PyAny>> {
    let task = Arc::new(Task {
        future: Mutex::new(Some(Box::pin(future))),
        bridge: bridge.inner.clone(),
        py_future: Mutex::new(None),
        scheduled: AtomicBool::new(false),
    });
    if let Some(out) = task.poll() {
        let ready = Ready {
            value: Mutex::new(Some(out(py))),
        };
        return Ok(Bound::new(py, ready)?.into_any());
    }
    let py_future = bridge.inner.event_loop(py)?.call_method0("create_future")?;
    py_future.call_method1(
        "add_done_callback",
        (OnDone {
            task: Arc::downgrade(&task),
        },),
    )?;
    *lock(&task.py_future) = Some(py_future.clone().unbind());
    Ok(py_future)
}

/// [`spawn`] of a future that fails with a [`Failure`] or succeeds with an [`Output`].
pub fn spawn_result<'py>(
    py: Python<'py>,
    bridge: &Bridge,
    future: impl Future<Output = Result<Output, Failure>> + Send + 'static,
) -> PyResult<Bound<'py, PyAny>> {
    spawn(py, bridge, async move { future.await.unwrap_or_else(fail) })
}

/// Runs `f` on tokio's blocking pool (for CPU work: tokenizing, model loading).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Failure::new("UnimicError", format!("worker failed: {e}"))))
}

/// A `PyResult` from a [`Failure`] result, for synchronous methods.
pub fn sync<T>(py: Python<'_>, r: Result<T, Failure>) -> PyResult<T> {
    r.py(py)
}

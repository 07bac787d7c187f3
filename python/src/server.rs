//! The server: [`serve`] answers every session with an agent, which is a Python object (its
//! async `respond(conversation, sink)` runs on the event loop that called `serve`) or one of
//! the Rust agents ([`EchoAgent`], [`LocalAgent`]).
//!
//! A Python agent is a Rust [`Agent`] ([`PyAgent`]) whose `respond` posts a job to the loop
//! that builds the conversation's Python objects, calls the agent and runs its coroutine as an
//! asyncio task; the agent's `await sink.text(...)` / `sink.image(...)` travel to the Rust
//! `respond` future through a channel and are written by the real [`ReplySink`], each call
//! completing once its bytes are on the QUIC stream (backpressure). When the client cancels,
//! the `respond` future is dropped and the asyncio task is cancelled. An exception in the agent
//! becomes `AgentError::Backend` (the client gets `AGENT_FAILED` with its text).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::path::PathBuf;
use tokio::sync::{mpsc, oneshot, watch};
use unimic_agents::{
    Agent, AgentError, AgentFuture, Capabilities, Content, Conversation, ImageRef, ReplySink, Role,
    SinkError,
};
use unimic_chat::{HistoryLimits, ServeOptions, TurnLog, TurnOutcome};
use unimic_codec::grid::{fill_region, TokenGrid};
use unimic_codec::tokenizer::{self, ImageTokenizer};

use unimic_transport::tls::ServerTls;
use unimic_transport::{ServerConfig, SessionConfig};

use crate::bridge::{self, blocking, output, spawn_result, Bridge};
use crate::client::{resolve, stack_of};
use crate::errors::Failure;
use crate::stack::{self, Models, Stack};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The echo agent: replies with the turn's text and images (`unimic.EchoAgent`).
#[pyclass(module = "unimic._native", frozen)]
pub struct EchoAgent;

#[pymethods]
impl EchoAgent {
    #[new]
    fn new() -> Self {
        EchoAgent
    }
}

/// The local token-native agent on the shipped masked and text-conditioned models
/// (`unimic.LocalAgent`): inpainting, outpainting, variations and text-to-image requests.
#[pyclass(module = "unimic._native", frozen)]
pub struct LocalAgent;

#[pymethods]
impl LocalAgent {
    #[new]
    fn new() -> Self {
        LocalAgent
    }
}

/// What a Python agent asks its sink to do.
enum Op {
    Text(String),
    Image(TokenGrid),
    /// The next rows of an image of `shape` (height, width); `last` ends it.
    Rows {
        shape: (u32, u32),
        ids: Vec<u32>,
        last: bool,
    },
    /// A whole edit of the conversation's image at `base` (checked by [`Sink::edit`]).
    Edit {
        base: ImageRef,
        grid: TokenGrid,
        region: Vec<bool>,
    },
    /// The next redrawn cells of an edit, in row-major order of its region's cells; `open`
    /// (base and region, checked by [`Sink::edit_cells`]) starts it, `last` ends it.
    EditCells {
        open: Option<(ImageRef, Vec<bool>)>,
        ids: Vec<u32>,
        last: bool,
    },
}

/// An edit a Python agent hands over cell by cell ([`Op::EditCells`]), while it is open.
struct OpenEdit {
    base: ImageRef,
    region: Vec<bool>,
    /// Whether the sink streams it (`ReplySink::begin_edit` said yes); if not, its cells are
    /// kept in `cells` and the edit goes whole when complete.
    streamed: bool,
    cells: Vec<u32>,
    /// Cells handed over so far, and the region's.
    got: usize,
    total: usize,
}

/// The conversation's image at `base` (its base grid), or why there is none.
fn base_image(conversation: &Conversation, base: ImageRef) -> Result<&TokenGrid, String> {
    conversation
        .turns
        .get(base.turn)
        .and_then(|t| t.content.get(base.content))
        .and_then(Content::base_image)
        .ok_or_else(|| {
            format!(
                "the conversation has no image at turn {}, item {}",
                base.turn, base.content
            )
        })
}

/// A region from one byte per cell (non-zero = redrawn), checked against the base's size.
fn region_of(bytes: &[u8], base: &TokenGrid) -> Result<Vec<bool>, Failure> {
    if bytes.len() != base.len() {
        return Err(Failure::content(format!(
            "the region has {} cells, the {}×{} image {}",
            bytes.len(),
            base.height(),
            base.width(),
            base.len()
        )));
    }
    Ok(bytes.iter().map(|&b| b != 0).collect())
}

/// Runs one [`Op::EditCells`] against the real sink.
async fn edit_cells(
    sink: &mut dyn ReplySink,
    conversation: &Conversation,
    open_edit: &mut Option<OpenEdit>,
    open: Option<(ImageRef, Vec<bool>)>,
    ids: &[u32],
    last: bool,
) -> Result<(), SinkError> {
    if let Some((base, region)) = open {
        if open_edit.is_some() {
            return Err(SinkError(
                "the agent's previous edit is not complete".into(),
            ));
        }
        let base_grid = base_image(conversation, base).map_err(SinkError)?;
        let streamed = sink.begin_edit(base, base_grid, &region).await?;
        *open_edit = Some(OpenEdit {
            base,
            total: region.iter().filter(|&&r| r).count(),
            region,
            streamed,
            cells: Vec::new(),
            got: 0,
        });
    }
    let Some(e) = open_edit.as_mut() else {
        return Err(SinkError("no edit was begun".into()));
    };
    let got = e.got + ids.len();
    if got > e.total || (last && got != e.total) {
        let total = e.total;
        *open_edit = None;
        return Err(SinkError(format!(
            "the agent's edit: {got} cells for a region of {total}"
        )));
    }
    e.got = got;
    if e.streamed {
        if last {
            *open_edit = None;
        }
        return sink.edit_tokens(ids, last).await;
    }
    e.cells.extend_from_slice(ids);
    if !last {
        return Ok(());
    }
    let Some(e) = open_edit.take() else {
        return Ok(());
    };
    let base_grid = base_image(conversation, e.base).map_err(SinkError)?;
    let ids = fill_region(base_grid.ids(), &e.region, &e.cells);
    let grid = TokenGrid::new(
        base_grid.height(),
        base_grid.width(),
        base_grid.codebook_size(),
        ids,
    )
    .map_err(|err| SinkError(format!("the agent's edit: {err}")))?;
    sink.image_edit(e.base, &grid, &e.region).await
}

struct SinkOp {
    op: Op,
    done: oneshot::Sender<Result<(), SinkError>>,
}

/// The sink a Python agent writes its reply into (`unimic.Sink` wraps it).
#[pyclass(module = "unimic._native", frozen)]
pub struct Sink {
    ops: mpsc::Sender<SinkOp>,
    /// Set when the receiver refused output: the agent's exception is then the sink's.
    refused: Arc<AtomicBool>,
    stack: Arc<Stack>,
    /// The conversation the agent answers (edits refer to its images).
    conversation: Arc<Conversation>,
}

async fn submit(
    ops: mpsc::Sender<SinkOp>,
    refused: Arc<AtomicBool>,
    op: Op,
) -> Result<bridge::Output, Failure> {
    let (done, rx) = oneshot::channel();
    let closed = || Failure::closed("the reply is finished: the sink takes no more output");
    ops.send(SinkOp { op, done }).await.map_err(|_| closed())?;
    match rx.await {
        Ok(Ok(())) => Ok(bridge::none()),
        Ok(Err(e)) => {
            refused.store(true, Ordering::Release);
            Err(Failure::closed(e.to_string()))
        }
        Err(_) => Err(closed()),
    }
}

#[pymethods]
impl Sink {
    /// Appends a text delta to the reply; an awaitable that completes once it is written.
    fn text<'py>(
        &self,
        py: Python<'py>,
        bridge: &Bridge,
        delta: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (ops, refused) = (self.ops.clone(), self.refused.clone());
        spawn_result(py, bridge, submit(ops, refused, Op::Text(delta)))
    }

    /// Appends an image given as a token grid (`height × width` little-endian u32 ids).
    fn grid<'py>(
        &self,
        py: Python<'py>,
        bridge: &Bridge,
        height: u32,
        width: u32,
        ids: Vec<u8>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let grid =
            stack::grid_from_bytes(height, width, &ids, self.stack.tokenizer.codebook_size())
                .map_err(|f| f.into_pyerr(py))?;
        let (ops, refused) = (self.ops.clone(), self.refused.clone());
        spawn_result(py, bridge, submit(ops, refused, Op::Image(grid)))
    }

    /// Appends the next rows of an image of `height` rows drawn row by row: `rows × width`
    /// little-endian u32 ids; `last` marks the rows that complete it. The server may send the
    /// rows so far before the rest are made (`ServeOptions::stream_images_after`).
    #[allow(clippy::too_many_arguments)]
    fn rows<'py>(
        &self,
        py: Python<'py>,
        bridge: &Bridge,
        height: u32,
        width: u32,
        rows: u32,
        ids: Vec<u8>,
        last: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let piece = stack::grid_from_bytes(rows, width, &ids, self.stack.tokenizer.codebook_size())
            .map_err(|f| f.into_pyerr(py))?;
        let op = Op::Rows {
            shape: (height, width),
            ids: piece.into_ids(),
            last,
        };
        let (ops, refused) = (self.ops.clone(), self.refused.clone());
        spawn_result(py, bridge, submit(ops, refused, op))
    }

    /// Appends an edit of the conversation's image at `turn`, `content` (Rust indices): the
    /// whole new grid (`height × width` little-endian u32 ids, the base's shape) and its
    /// region (one byte per cell, non-zero = redrawn); outside the region the grid must equal
    /// the base. The server sends only the region's cells when it can (as for Rust agents).
    #[allow(clippy::too_many_arguments)]
    fn edit<'py>(
        &self,
        py: Python<'py>,
        bridge: &Bridge,
        turn: usize,
        content: usize,
        height: u32,
        width: u32,
        ids: Vec<u8>,
        region: Vec<u8>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let base = ImageRef { turn, content };
        let checked = (|| {
            let base_grid = base_image(&self.conversation, base).map_err(Failure::content)?;
            let grid = stack::grid_from_bytes(height, width, &ids, base_grid.codebook_size())?;
            if (grid.height(), grid.width()) != (base_grid.height(), base_grid.width()) {
                return Err(Failure::content(format!(
                    "the edit is {height}×{width}, the image it edits {}×{}",
                    base_grid.height(),
                    base_grid.width()
                )));
            }
            let region = region_of(&region, base_grid)?;
            let changed = grid
                .ids()
                .iter()
                .zip(base_grid.ids())
                .zip(&region)
                .position(|((a, b), &r)| !r && a != b);
            if let Some(i) = changed {
                return Err(Failure::content(format!(
                    "the edit changes cell ({}, {}), which is outside its region",
                    i / width as usize,
                    i % width as usize
                )));
            }
            Ok(Op::Edit { base, grid, region })
        })()
        .map_err(|f| f.into_pyerr(py))?;
        let (ops, refused) = (self.ops.clone(), self.refused.clone());
        spawn_result(py, bridge, submit(ops, refused, checked))
    }

    /// Appends the next redrawn cells of an edit (`ids`: little-endian u32, row-major over the
    /// region's cells); `open` (`turn`, `content`, region bytes) starts the edit, `last` marks
    /// the cells that complete it. The server may send the cells so far before the rest are
    /// made (`ServeOptions::stream_images_after`).
    #[pyo3(signature = (bridge, ids, last, open=None))]
    fn edit_cells<'py>(
        &self,
        py: Python<'py>,
        bridge: &Bridge,
        ids: Vec<u8>,
        last: bool,
        open: Option<(usize, usize, Vec<u8>)>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let codes = self.stack.tokenizer.codebook_size();
        let checked = (|| {
            if ids.len() % 4 != 0 {
                return Err(Failure::content(format!(
                    "cell ids are 4 bytes each, got {} bytes",
                    ids.len()
                )));
            }
            let cells = if ids.is_empty() {
                Vec::new()
            } else {
                stack::grid_from_bytes(1, (ids.len() / 4) as u32, &ids, codes)?.into_ids()
            };
            let open = match open {
                None => None,
                Some((turn, content, region)) => {
                    let base = ImageRef { turn, content };
                    let base_grid =
                        base_image(&self.conversation, base).map_err(Failure::content)?;
                    Some((base, region_of(&region, base_grid)?))
                }
            };
            Ok(Op::EditCells {
                open,
                ids: cells,
                last,
            })
        })()
        .map_err(|f| f.into_pyerr(py))?;
        let (ops, refused) = (self.ops.clone(), self.refused.clone());
        spawn_result(py, bridge, submit(ops, refused, checked))
    }

    /// Appends an image given as pixels (`width × height × 3` bytes), scaled down to
    /// `max_side` and tokenized off the event loop.
    #[pyo3(signature = (bridge, width, height, rgb, max_side=1024))]
    fn pixels<'py>(
        &self,
        py: Python<'py>,
        bridge: &Bridge,
        width: u32,
        height: u32,
        rgb: Vec<u8>,
        max_side: u32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (ops, refused) = (self.ops.clone(), self.refused.clone());
        let tok = self.stack.tokenizer.clone();
        spawn_result(py, bridge, async move {
            let grid = blocking(move || {
                let img = tokenizer::fit(stack::rgb_from_bytes(width, height, rgb)?, max_side);
                tok.encode(&img)
                    .map_err(|e| Failure::content(format!("tokenizing the image: {e}")))
            })
            .await?;
            submit(ops, refused, Op::Image(grid)).await
        })
    }
}

/// The conversation as plain Python values: a list of `(role, items, at)` where an item is a
/// `str`, `("grid", height, width, ids)`, `("levels", n, height, width, ids)`,
/// `("request", json)` or `("raw", media_type, bytes)`, and `at` the index of each item in the
/// turn's content (edits name an image by it); the Python package makes `unimic.Conversation`
/// of it.
fn conversation_items<'py>(py: Python<'py>, c: &Conversation) -> PyResult<Bound<'py, PyList>> {
    let turns = PyList::empty(py);
    for turn in &c.turns {
        // The index in `turn.content` of each item given (edits name images by it).
        let mut at = Vec::with_capacity(turn.content.len());
        let role = match turn.role {
            Role::System => "system",
            Role::Assistant => "assistant",
            _ => "user",
        };
        let items = PyList::empty(py);
        for (index, content) in turn.content.iter().enumerate() {
            let given = items.len();
            match content {
                Content::Text { text, .. } => items.append(text)?,
                Content::Image(g) => items.append((
                    "grid",
                    g.height(),
                    g.width(),
                    PyBytes::new(py, &stack::grid_bytes(g)),
                ))?,
                Content::ImageLevels(levels) => {
                    let Some(base) = levels.first() else { continue };
                    let ids: Vec<u8> = levels.iter().flat_map(stack::grid_bytes).collect();
                    items.append((
                        "levels",
                        levels.len(),
                        base.height(),
                        base.width(),
                        PyBytes::new(py, &ids),
                    ))?
                }
                Content::Request(r) => items.append(("request", PyBytes::new(py, &r.to_json())))?,
                Content::Raw { media_type, bytes } => {
                    items.append(("raw", media_type, PyBytes::new(py, bytes)))?
                }
                _ => {}
            }
            if items.len() > given {
                at.push(index);
            }
        }
        turns.append((role, items, at))?;
    }
    Ok(turns)
}

static ENSURE_FUTURE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// How a Python agent's turn ended.
type Finished = Result<(), (String, bool)>;

/// Called by asyncio when an agent's task is done: hands its outcome to the Rust side.
#[pyclass(module = "unimic._native", frozen)]
struct AgentDone {
    tx: Arc<Mutex<Option<oneshot::Sender<Finished>>>>,
    refused: Arc<AtomicBool>,
    /// The slot that holds the task (cleared here, with the GIL).
    task_slot: Arc<Mutex<Option<Py<PyAny>>>>,
}

#[pymethods]
impl AgentDone {
    fn __call__(&self, task: Bound<'_, PyAny>) -> PyResult<()> {
        let outcome = if task.call_method0("cancelled")?.is_truthy()? {
            Err(("the agent's task was cancelled".to_string(), true))
        } else {
            let exc = task.call_method0("exception")?;
            if exc.is_none() {
                Ok(())
            } else {
                let name = exc.get_type().name()?.to_string();
                Err((
                    format!("{name}: {}", exc.str()?),
                    self.refused.load(Ordering::Acquire),
                ))
            }
        };
        drop(lock(&self.task_slot).take());
        if let Some(tx) = lock(&self.tx).take() {
            let _ = tx.send(outcome);
        }
        Ok(())
    }
}

/// A Python agent as a Rust [`Agent`] (see the module docs).
struct PyAgent {
    /// `entry(conversation_items, sink) -> awaitable`, made by the Python package around the
    /// user's agent.
    entry: Arc<Py<PyAny>>,
    bridge: Arc<bridge::Inner>,
    stack: Arc<Stack>,
}

/// Cancels the agent's asyncio task when the `respond` future is dropped before it finished.
struct CancelTask {
    task: Arc<Mutex<Option<Py<PyAny>>>>,
    bridge: Arc<bridge::Inner>,
    armed: bool,
}

impl Drop for CancelTask {
    fn drop(&mut self) {
        if self.armed {
            let task = self.task.clone();
            self.bridge.post(Box::new(move |py| {
                if let Some(t) = lock(&task).take() {
                    let _ = t.bind(py).call_method0("cancel");
                }
            }));
        }
    }
}

impl Drop for PyAgent {
    fn drop(&mut self) {
        // The entry (and the agent it calls) is released on the loop, with the GIL: dropped on
        // a tokio thread, Python would release it only later.
        let entry = self.entry.clone();
        self.bridge.post(Box::new(move |_py| drop(entry)));
    }
}

impl PyAgent {
    /// On the loop: calls the agent and runs its awaitable as a task.
    #[allow(clippy::too_many_arguments)]
    fn start(
        py: Python<'_>,
        entry: &Py<PyAny>,
        bridge: &bridge::Inner,
        conversation: &Conversation,
        sink: Sink,
        done: &Arc<Mutex<Option<oneshot::Sender<Finished>>>>,
        task_slot: &Arc<Mutex<Option<Py<PyAny>>>>,
    ) -> PyResult<()> {
        let refused = sink.refused.clone();
        let items = conversation_items(py, conversation)?;
        let awaitable = entry.call1(py, (items, Bound::new(py, sink)?))?;
        let ensure_future = ENSURE_FUTURE.get_or_try_init(py, || {
            py.import("asyncio")?
                .getattr("ensure_future")
                .map(Bound::unbind)
        })?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("loop", bridge.event_loop(py)?)?;
        let task = ensure_future.call(py, (awaitable,), Some(&kwargs))?;
        task.call_method1(
            py,
            "add_done_callback",
            (AgentDone {
                tx: done.clone(),
                refused,
                task_slot: task_slot.clone(),
            },),
        )?;
        if !task.call_method0(py, "done")?.is_truthy(py)? {
            *lock(task_slot) = Some(task);
        }
        Ok(())
    }
}

impl Agent for PyAgent {
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.image_input = true;
        c.image_output = true;
        c.streaming = true;
        c
    }

    fn respond<'a>(
        &'a self,
        conversation: &'a Conversation,
        sink: &'a mut dyn ReplySink,
    ) -> AgentFuture<'a> {
        Box::pin(async move {
            let (ops_tx, mut ops_rx) = mpsc::channel::<SinkOp>(1);
            let (done_tx, mut done_rx) = oneshot::channel::<Finished>();
            let done = Arc::new(Mutex::new(Some(done_tx)));
            let task_slot = Arc::new(Mutex::new(None));
            let mut cancel = CancelTask {
                task: task_slot.clone(),
                bridge: self.bridge.clone(),
                armed: true,
            };
            {
                let entry = self.entry.clone();
                let bridge = self.bridge.clone();
                let conversation = Arc::new(conversation.clone());
                let py_sink = Sink {
                    ops: ops_tx,
                    refused: Arc::new(AtomicBool::new(false)),
                    stack: self.stack.clone(),
                    conversation: conversation.clone(),
                };
                let done = done.clone();
                self.bridge.post(Box::new(move |py| {
                    if let Err(e) = Self::start(
                        py,
                        &entry,
                        &bridge,
                        &conversation,
                        py_sink,
                        &done,
                        &task_slot,
                    ) {
                        let name = e
                            .get_type(py)
                            .name()
                            .map(|n| n.to_string())
                            .unwrap_or_else(|_| "Exception".into());
                        if let Some(tx) = lock(&done).take() {
                            let _ = tx.send(Err((format!("{name}: {}", e.value(py)), false)));
                        }
                    }
                }));
            }
            let mut open_edit: Option<OpenEdit> = None;
            loop {
                tokio::select! {
                    r = &mut done_rx => {
                        cancel.armed = false;
                        if let (Ok(Ok(())), Some(e)) = (&r, &open_edit) {
                            // An edit left open (collected, or partly streamed) cannot end the
                            // reply: the client would get no grid, or half a part.
                            return Err(AgentError::Backend(format!(
                                "the agent returned, but the edit begun is not complete ({} of {} cells)",
                                e.got, e.total
                            )));
                        }
                        return match r {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err((msg, true))) => Err(AgentError::Sink(SinkError(msg))),
                            Ok(Err((msg, false))) => Err(AgentError::Backend(msg)),
                            Err(_) => Err(AgentError::Backend(
                                "the agent's task was dropped (is the event loop still running?)".into(),
                            )),
                        };
                    }
                    Some(SinkOp { op, done }) = ops_rx.recv() => {
                        let r = match op {
                            Op::Text(t) => sink.text_delta(&t).await,
                            Op::Image(g) => sink.image_tokens((g.height(), g.width()), g.ids(), true).await,
                            Op::Rows { shape, ids, last } => sink.image_tokens(shape, &ids, last).await,
                            Op::Edit { base, grid, region } => sink.image_edit(base, &grid, &region).await,
                            Op::EditCells { open, ids, last } => {
                                edit_cells(sink, conversation, &mut open_edit, open, &ids, last).await
                            }
                        };
                        let _ = done.send(r);
                    }
                }
            }
        })
    }
}

/// Serves every session on `addr` with `agent`: an awaitable of a [`Server`]. `agent` is an
/// [`EchoAgent`], a [`LocalAgent`], or `entry(conversation_items, sink) -> awaitable` (the
/// Python package makes it around a Python agent).
#[pyfunction]
#[pyo3(signature = (bridge, addr, agent, models, token=None, cert=None, key=None, history=None))]
#[allow(clippy::too_many_arguments)]
pub fn serve<'py>(
    py: Python<'py>,
    bridge: &Bridge,
    addr: String,
    agent: Bound<'py, PyAny>,
    models: Py<Models>,
    token: Option<Vec<u8>>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    history: Option<(usize, usize)>,
) -> PyResult<Bound<'py, PyAny>> {
    let history = match history {
        None => HistoryLimits::default(),
        Some((0, _)) | Some((_, 0)) => {
            return Err(
                Failure::content("history_turns and history_bytes must be at least 1")
                    .into_pyerr(py),
            )
        }
        Some((max_turns, max_bytes)) => HistoryLimits {
            max_turns,
            max_bytes,
        },
    };
    let tls = match (cert, key) {
        (Some(c), Some(k)) => ServerTls::from_pem_files(&c, &k).map_err(|e| {
            Failure::content(format!("cert {} / key {}: {e}", c.display(), k.display()))
                .into_pyerr(py)
        })?,
        (None, None) => ServerTls::self_signed().map_err(|e| {
            Failure::new("UnimicError", format!("making the certificate: {e}")).into_pyerr(py)
        })?,
        _ => return Err(Failure::content("cert and key go together").into_pyerr(py)),
    };
    enum Which {
        Echo,
        Local,
        Python(Arc<Py<PyAny>>),
    }
    let which = if agent.is_instance_of::<EchoAgent>() {
        Which::Echo
    } else if agent.is_instance_of::<LocalAgent>() {
        Which::Local
    } else if agent.is_callable() {
        Which::Python(Arc::new(agent.unbind()))
    } else {
        return Err(Failure::content(
            "the agent must be callable (entry made by unimic.serve), EchoAgent or LocalAgent",
        )
        .into_pyerr(py));
    };
    let inner = bridge.inner.clone();
    spawn_result(py, bridge, async move {
        let stack = stack_of(models).await?;
        let agent: Arc<dyn Agent> = match which {
            Which::Echo => Arc::new(unimic_agents::echo::Echo),
            Which::Local => {
                let s = stack.clone();
                let local = blocking(move || s.local_agent()).await?;
                Arc::new(SharedAgent(local))
            }
            Which::Python(entry) => Arc::new(PyAgent {
                entry,
                bridge: inner,
                stack: stack.clone(),
            }),
        };
        let addr = resolve(&addr).await?;
        let pin = tls.identity.cert_hash();
        let session = SessionConfig::default()
            .with_tokenizer(stack.info.clone())
            .with_codec(stack.codec.clone());
        let mut config = ServerConfig::new(tls).with_bind(addr).with_session(session);
        if let Some(t) = token {
            config = config.with_tokens([t]);
        }
        let server = unimic_transport::Server::bind(config)
            .map_err(|e| Failure::new("ConnectError", format!("listening on {addr}: {e}")))?;
        let local = server
            .local_addr()
            .map_err(|e| Failure::new("ConnectError", e.to_string()))?;
        let turns: Arc<Mutex<VecDeque<TurnLog>>> = Arc::default();
        let log = turns.clone();
        let options = ServeOptions::default()
            .with_history(history)
            .on_turn(move |t| {
                let mut l = lock(&log);
                if l.len() >= MAX_TURN_LOGS {
                    l.pop_front();
                }
                l.push_back(t.clone());
            });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = watch::channel(false);
        tokio::spawn(async move {
            unimic_chat::serve_until(server, agent, options, async move {
                let _ = stop_rx.await;
            })
            .await;
            let _ = done_tx.send(true);
        });
        Ok(output(Server {
            addr: local.to_string(),
            pin: pin.to_string(),
            stop: Mutex::new(Some(stop_tx)),
            done: done_rx,
            turns,
        }))
    })
}

/// Turn logs a [`Server`] keeps (the most recent).
const MAX_TURN_LOGS: usize = 1000;

/// An `Arc`'d agent as an agent.
struct SharedAgent(Arc<unimic_agents::local::LocalAgent>);

impl Agent for SharedAgent {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    fn respond<'a>(
        &'a self,
        conversation: &'a Conversation,
        sink: &'a mut dyn ReplySink,
    ) -> AgentFuture<'a> {
        self.0.respond(conversation, sink)
    }
}

/// A running server (`unimic.Server` wraps it).
#[pyclass(module = "unimic._native", frozen)]
pub struct Server {
    addr: String,
    pin: String,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    done: watch::Receiver<bool>,
    turns: Arc<Mutex<VecDeque<TurnLog>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = lock(&self.stop).take() {
            let _ = s.send(());
        }
    }
}

#[pymethods]
impl Server {
    /// The address it listens on (`host:port`).
    #[getter]
    fn address(&self) -> String {
        self.addr.clone()
    }

    /// The SHA-256 of its certificate, which clients pin.
    #[getter]
    fn pin(&self) -> String {
        self.pin.clone()
    }

    /// Whether it has stopped.
    #[getter]
    fn closed(&self) -> bool {
        *self.done.borrow()
    }

    /// Stops accepting, closes every session, and completes once the socket is released.
    fn close<'py>(&self, py: Python<'py>, bridge: &Bridge) -> PyResult<Bound<'py, PyAny>> {
        if let Some(s) = lock(&self.stop).take() {
            let _ = s.send(());
        }
        self.wait(py, bridge)
    }

    /// Completes when the server has stopped.
    fn wait<'py>(&self, py: Python<'py>, bridge: &Bridge) -> PyResult<Bound<'py, PyAny>> {
        let mut done = self.done.clone();
        spawn_result(py, bridge, async move {
            let _ = done.wait_for(|d| *d).await;
            Ok(bridge::none())
        })
    }

    /// The turns answered so far (the most recent 1,000), oldest first: dicts with `turn`,
    /// `reply`, `remote`, `bytes_in`, `bytes_out`, `seconds` and `outcome` (`answered`,
    /// `cancelled`, `agent failed: ...`, `failed: ...`).
    fn turns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for t in lock(&self.turns).iter() {
            let d = PyDict::new(py);
            d.set_item("turn", t.turn)?;
            d.set_item("reply", t.reply)?;
            d.set_item("remote", t.remote.to_string())?;
            d.set_item("bytes_in", t.bytes_in)?;
            d.set_item("bytes_out", t.bytes_out)?;
            d.set_item("seconds", t.elapsed.as_secs_f64())?;
            let outcome = match &t.outcome {
                TurnOutcome::Answered => "answered".to_string(),
                TurnOutcome::Cancelled => "cancelled".to_string(),
                TurnOutcome::AgentFailed(r) => format!("agent failed: {r}"),
                TurnOutcome::Failed(r) => format!("failed: {r}"),
                other => format!("{other:?}"),
            };
            d.set_item("outcome", outcome)?;
            out.append(d)?;
        }
        Ok(out)
    }
}

//! The client: [`connect`] gives a [`Client`] (an `unimic_chat::Chat` on the shipped models),
//! whose `send` gives a [`Reply`] whose `next` gives its events one by one.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use std::path::PathBuf;
use unimic_agents::request::Request;
use unimic_chat::{Chat, ChatConfig, Prompt, ReplyEvent, ReplyStats};
use unimic_codec::grid::TokenGrid;
use unimic_codec::tokenizer::{self, ImageTokenizer};

use unimic_transport::tls::{CertHash, Roots};

use crate::bridge::{self, blocking, output, spawn_result, Bridge, Output};
use crate::errors::Failure;
use crate::stack::{self, Models, Stack};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stack of `models`, loaded on the blocking pool the first time.
pub async fn stack_of(models: Py<Models>) -> Result<Arc<Stack>, Failure> {
    if let Some(r) = models.get().loaded() {
        return r;
    }
    blocking(move || models.get().stack()).await
}

/// `host:port` to a socket address (names are looked up).
pub async fn resolve(addr: &str) -> Result<SocketAddr, Failure> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    let bad = |e: String| Failure::new("ConnectError", format!("address {addr:?}: {e}"));
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("no address found".into()))
}

/// Connects to a unimic server; an awaitable of a [`Client`].
#[pyfunction]
#[pyo3(signature = (bridge, addr, pin, models, token=None, connect_timeout=10.0, reply_timeout=Some(60.0), idle_timeout=15.0, context_reuse=true, ca=None, server_name=None))]
#[allow(clippy::too_many_arguments)]
pub fn connect<'py>(
    py: Python<'py>,
    bridge: &Bridge,
    addr: String,
    pin: Option<String>,
    models: Py<Models>,
    token: Option<Vec<u8>>,
    connect_timeout: f64,
    reply_timeout: Option<f64>,
    idle_timeout: f64,
    context_reuse: bool,
    ca: Option<PathBuf>,
    server_name: Option<String>,
) -> PyResult<Bound<'py, PyAny>> {
    let base = match (pin, ca) {
        (Some(pin), None) => {
            let hash: CertHash = pin.trim().parse().map_err(|e| {
                Failure::content(format!(
                    "pin {pin:?} is not a certificate hash (64 hex digits, as `unimic serve` prints it): {e}"
                ))
                .into_pyerr(py)
            })?;
            ChatConfig::pinned(hash)
        }
        (None, Some(ca)) => {
            let roots = Roots::from_pem_file(&ca).map_err(|e| {
                Failure::content(format!("ca {}: {e}", ca.display())).into_pyerr(py)
            })?;
            ChatConfig::webpki(roots)
        }
        _ => return Err(Failure::content(
            "give either pin (the certificate hash `unimic serve` prints) or ca (a PEM file of \
                 the CA certificates that signed the server's)",
        )
        .into_pyerr(py)),
    };
    let base = match server_name {
        Some(name) => base.with_server_name(name),
        None => base,
    };
    let secs = |s: f64, what: &str| -> PyResult<Duration> {
        Duration::try_from_secs_f64(s).map_err(|_| {
            Failure::content(format!("{what}={s}: a number of seconds >= 0")).into_pyerr(py)
        })
    };
    let connect_timeout = secs(connect_timeout, "connect_timeout")?;
    let idle_timeout = secs(idle_timeout, "idle_timeout")?;
    let reply_timeout = reply_timeout
        .map(|s| secs(s, "reply_timeout"))
        .transpose()?;
    spawn_result(py, bridge, async move {
        let stack = stack_of(models).await?;
        let addr = resolve(&addr).await?;
        let mut config = base
            .with_codec(stack.codec.clone())
            .with_pixels(stack.nearest_tokenizer())
            .map_err(Failure::from)?
            // Codes chosen for the generic model's bits only where the server codes with it.
            .with_generic_pixels(stack.tokenizer.clone())
            .map_err(Failure::from)?
            .with_reply_timeout(reply_timeout)
            .with_idle_timeout(idle_timeout)
            .with_context_reuse(context_reuse);
        config.connect_timeout = connect_timeout;
        if let Some(t) = token {
            config = config.with_token(t);
        }
        let chat = Chat::connect(addr, config).await?;
        Ok(output(Client {
            chat: Mutex::new(Some(Arc::new(chat))),
            stack,
            remote: addr,
        }))
    })
}

/// A connected client (`unimic.Client` wraps it).
#[pyclass(module = "unimic._native", frozen)]
pub struct Client {
    chat: Mutex<Option<Arc<Chat>>>,
    stack: Arc<Stack>,
    remote: SocketAddr,
}

/// One part of a turn, as the Python package hands it over.
enum Part {
    Text(String),
    /// Width, height, RGB bytes, levels of the quality ladder to send.
    Pixels(u32, u32, Vec<u8>, usize),
    Grid(TokenGrid),
    /// An image as a quality ladder: base grid first.
    Levels(Vec<TokenGrid>),
    Request(Request),
}

fn parse_part(item: &Bound<'_, PyAny>, codebook: u32) -> PyResult<Result<Part, Failure>> {
    let t = item.cast::<PyTuple>()?;
    let kind: String = t.get_item(0)?.extract()?;
    Ok(match kind.as_str() {
        "text" => Ok(Part::Text(t.get_item(1)?.extract()?)),
        "pixels" => {
            let levels: usize = match t.len() {
                n if n > 4 => t.get_item(4)?.extract()?,
                _ => 1,
            };
            Ok(Part::Pixels(
                t.get_item(1)?.extract()?,
                t.get_item(2)?.extract()?,
                t.get_item(3)?.extract()?,
                levels,
            ))
        }
        "levels" => {
            let n: usize = t.get_item(1)?.extract()?;
            let (h, w): (u32, u32) = (t.get_item(2)?.extract()?, t.get_item(3)?.extract()?);
            let ids: Vec<u8> = t.get_item(4)?.extract()?;
            let per = (h as usize) * (w as usize) * 4;
            if n == 0 || per == 0 || ids.len() != n.saturating_mul(per) {
                Err(Failure::content(format!(
                    "{n} levels of {h}x{w} grids need {} id bytes, got {}",
                    n.saturating_mul(per),
                    ids.len()
                )))
            } else {
                ids.chunks(per)
                    .map(|c| stack::grid_from_bytes(h, w, c, codebook))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Part::Levels)
            }
        }
        "grid" => {
            let ids: Vec<u8> = t.get_item(3)?.extract()?;
            stack::grid_from_bytes(
                t.get_item(1)?.extract()?,
                t.get_item(2)?.extract()?,
                &ids,
                codebook,
            )
            .map(Part::Grid)
        }
        "request" => {
            let json: Vec<u8> = t.get_item(1)?.extract()?;
            Request::from_json(&json)
                .map(Part::Request)
                .map_err(|e| Failure::content(format!("the request: {e}")))
        }
        other => Err(Failure::content(format!("unknown part kind {other:?}"))),
    })
}

#[pymethods]
impl Client {
    /// The server's address.
    #[getter]
    fn remote(&self) -> String {
        self.remote.to_string()
    }

    /// Whether [`close`](Self::close) was called.
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.chat).is_none()
    }

    /// Sends a turn: `parts` is a list of `("text", str)`, `("pixels", width, height, rgb[,
    /// levels])`, `("grid", height, width, ids)`, `("levels", n, height, width, ids)` (a quality
    /// ladder, base first) and `("request", json)`; pixels are scaled down to
    /// `max_side` and tokenized off the event loop. An awaitable of its [`Reply`], whose images
    /// are decoded to pixels when `decode_images`, and which also gives the first rows of an
    /// image still arriving when `image_rows`.
    #[pyo3(signature = (bridge, parts, decode_images=true, max_side=1024, image_rows=false))]
    fn send<'py>(
        &self,
        py: Python<'py>,
        bridge: &Bridge,
        parts: Bound<'py, PyList>,
        decode_images: bool,
        max_side: u32,
        image_rows: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let chat = lock(&self.chat)
            .clone()
            .ok_or_else(|| Failure::closed("the client is closed").into_pyerr(py))?;
        let codebook = self.stack.tokenizer.codebook_size();
        let mut items = Vec::with_capacity(parts.len());
        for item in parts.iter() {
            items.push(parse_part(&item, codebook)?.map_err(|f| f.into_pyerr(py))?);
        }
        let stack = self.stack.clone();
        spawn_result(py, bridge, async move {
            let mut prompt = Prompt::default();
            for item in items {
                prompt = match item {
                    Part::Text(t) => prompt.with_text(t),
                    Part::Grid(g) => prompt.with_grid(g),
                    Part::Levels(levels) => prompt.with_grid_levels(levels),
                    Part::Request(r) => prompt.with_request(r),
                    Part::Pixels(w, h, rgb, levels) => {
                        // Resizing a large photo takes a while: off the loop.
                        let img = if w.max(h) > max_side && max_side != 0 {
                            blocking(move || {
                                Ok(tokenizer::fit(stack::rgb_from_bytes(w, h, rgb)?, max_side))
                            })
                            .await?
                        } else {
                            stack::rgb_from_bytes(w, h, rgb)?
                        };
                        prompt.with_image_levels(img, levels)
                    }
                };
            }
            let reply = chat.send(prompt).await?;
            Ok(output(Reply {
                turn: reply.turn(),
                sent: stats_of(reply.sent()),
                state: Arc::new(tokio::sync::Mutex::new(ReplyState {
                    reply: Some(reply),
                    image: None,
                })),
                stats: Arc::new(Mutex::new(None)),
                cancel: tokio::sync::watch::channel(false).0,
                decode_images,
                image_rows,
                stack,
            }))
        })
    }

    /// Ends the session (go-away, close, the connection drained) within `grace` seconds; the
    /// client's socket and tasks are gone once its replies are dropped. Replies still waiting
    /// end with `ClosedError`.
    #[pyo3(signature = (bridge, grace=1.0))]
    fn close<'py>(
        &self,
        py: Python<'py>,
        bridge: &Bridge,
        grace: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let chat = lock(&self.chat).take();
        let grace = Duration::try_from_secs_f64(grace).unwrap_or(Duration::from_secs(1));
        spawn_result(py, bridge, async move {
            if let Some(chat) = chat {
                chat.shutdown(grace).await;
            }
            Ok(bridge::none())
        })
    }
}

/// What the Python side sees of a message's statistics.
#[derive(Debug, Clone, Copy)]
struct Sent {
    wire_bytes: u64,
    payload_bytes: u64,
    tokens: u64,
}

fn stats_of(s: &unimic_transport::MessageStats) -> Sent {
    Sent {
        wire_bytes: s.wire_bytes,
        payload_bytes: s.payload_bytes,
        tokens: s.tokens,
    }
}

struct ReplyState {
    reply: Option<unimic_chat::Reply>,
    /// An image event taken from the reply but not handed over yet (its decoding was
    /// interrupted): handed over first.
    image: Option<TokenGrid>,
}

/// The reply to one turn (`unimic.Reply` wraps it).
#[pyclass(module = "unimic._native", frozen)]
pub struct Reply {
    turn: u64,
    sent: Sent,
    state: Arc<tokio::sync::Mutex<ReplyState>>,
    stats: Arc<Mutex<Option<ReplyStats>>>,
    cancel: tokio::sync::watch::Sender<bool>,
    decode_images: bool,
    /// Hand over `ReplyEvent::ImageRows` too.
    image_rows: bool,
    stack: Arc<Stack>,
}

/// The first `rows` rows of an image still arriving, for Python: `("rows", height, width, rows,
/// ids)`.
fn rows_output(height: u32, width: u32, rows: u32, ids: Vec<u32>) -> Output {
    Box::new(move |py| {
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        let t = ("rows", height, width, rows, PyBytes::new(py, &bytes)).into_pyobject(py)?;
        Ok(t.into_any().unbind())
    })
}

/// An image event for Python.
fn image_output(grid: TokenGrid, pixels: Option<image::RgbImage>) -> Output {
    Box::new(move |py| {
        let t = match pixels {
            Some(img) => (
                "pixels",
                img.width(),
                img.height(),
                PyBytes::new(py, img.as_raw()),
            )
                .into_pyobject(py)?,
            None => (
                "grid",
                grid.height(),
                grid.width(),
                PyBytes::new(py, &stack::grid_bytes(&grid)),
            )
                .into_pyobject(py)?,
        };
        Ok(t.into_any().unbind())
    })
}

#[pymethods]
impl Reply {
    /// The turn's message id.
    #[getter]
    fn turn(&self) -> u64 {
        self.turn
    }

    /// The next event: an awaitable of a `str` (a text delta), `("pixels", width, height, rgb)`
    /// or `("grid", height, width, ids)` (an image), `("rows", height, width, rows, ids)` (the
    /// first rows of an image still arriving, when asked for), or `None` at the end (then
    /// [`stats`] holds the turn's statistics). Cancelling the await loses no event.
    fn next<'py>(&self, py: Python<'py>, bridge: &Bridge) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        let stats = self.stats.clone();
        let mut cancelled = self.cancel.subscribe();
        let decode = self.decode_images;
        let rows_wanted = self.image_rows;
        let tok = self.stack.tokenizer.clone();
        spawn_result(py, bridge, async move {
            let mut g = state.lock().await;
            loop {
                if let Some(grid) = g.image.clone() {
                    let pixels = if decode {
                        let tok = tok.clone();
                        let grid = grid.clone();
                        let img = bridge::blocking(move || {
                            tok.decode(&grid).map_err(|e| {
                                Failure::codec(format!("detokenizing the reply's image: {e}"))
                            })
                        })
                        .await?;
                        Some(img)
                    } else {
                        None
                    };
                    g.image = None;
                    return Ok(image_output(grid, pixels));
                }
                let Some(reply) = g.reply.as_mut() else {
                    return if *cancelled.borrow() {
                        Err(Failure::new(
                            "ReplyCancelledError",
                            "the reply was cancelled",
                        ))
                    } else {
                        Ok(bridge::none())
                    };
                };
                let ev = tokio::select! {
                    biased;
                    ev = reply.next() => ev,
                    _ = cancelled.wait_for(|c| *c) => {
                        return Err(Failure::new("ReplyCancelledError", "the reply was cancelled"));
                    }
                };
                match ev {
                    None => {
                        g.reply = None;
                        return Ok(bridge::none());
                    }
                    Some(Err(e)) => {
                        g.reply = None;
                        return Err(e.into());
                    }
                    Some(Ok(ReplyEvent::Text(t))) => return Ok(output(t)),
                    Some(Ok(ReplyEvent::ImageRows {
                        height,
                        width,
                        rows,
                        ids,
                    })) if rows_wanted => return Ok(rows_output(height, width, rows, ids)),
                    Some(Ok(ReplyEvent::Image(grid))) => g.image = Some(grid),
                    Some(Ok(ReplyEvent::End(s))) => {
                        *lock(&stats) = Some(s);
                        g.reply = None;
                        return Ok(bridge::none());
                    }
                    Some(Ok(_)) => {}
                }
            }
        })
    }

    /// Cancels the reply: the server stops its agent, and a pending or later `next` raises
    /// `ReplyCancelledError`. An awaitable of `None`.
    fn cancel<'py>(&self, py: Python<'py>, bridge: &Bridge) -> PyResult<Bound<'py, PyAny>> {
        self.cancel.send_replace(true);
        let state = self.state.clone();
        spawn_result(py, bridge, async move {
            let reply = state.lock().await.reply.take();
            if let Some(r) = reply {
                r.cancel().await;
            }
            Ok(bridge::none())
        })
    }

    /// The turn's and the reply's statistics once the reply has ended, else `None`: bytes on
    /// the wire each way, payload bytes, tokens, and the seconds from sending to the end.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let g = lock(&self.stats);
        let Some(s) = g.as_ref() else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("turn", s.turn)?;
        d.set_item("reply", s.reply)?;
        d.set_item("sent_wire_bytes", s.sent.wire_bytes)?;
        d.set_item("sent_payload_bytes", s.sent.payload_bytes)?;
        d.set_item("sent_tokens", s.sent.tokens)?;
        d.set_item("received_wire_bytes", s.received.wire_bytes)?;
        d.set_item("received_payload_bytes", s.received.payload_bytes)?;
        d.set_item("received_tokens", s.received.tokens)?;
        d.set_item("seconds", s.elapsed.as_secs_f64())?;
        Ok(Some(d))
    }

    /// The turn as sent: `(wire bytes, payload bytes, tokens)`.
    #[getter]
    fn sent(&self) -> (u64, u64, u64) {
        (
            self.sent.wire_bytes,
            self.sent.payload_bytes,
            self.sent.tokens,
        )
    }
}

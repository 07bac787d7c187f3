//! `unimic._native`: the extension module under the `unimic` Python package (`python/unimic/`).
//!
//! A thin binding over `unimic-chat` (the [`Chat`](unimic_chat::Chat) client, `serve_until` and
//! the `Agent` trait), `unimic-codec` (tokenizer, `.umic` files) and `unimic-agents`; the Python
//! package around it turns PIL images and numpy arrays into bytes and back, and defines the
//! exception classes (`unimic.errors`) this module raises.
//!
//! # Async without blocking the event loop
//! Every async method returns an awaitable that runs a Rust future **on the asyncio loop's
//! thread**: [`bridge`] polls it once at once (a turn whose bytes can be written straight away
//! never leaves the loop), and when it has to wait, its waker posts a poll to the loop through a
//! socket pair the loop watches (`loop.add_reader`), or, for a loop that cannot watch one
//! (Windows), through a relay thread that calls `loop.call_soon_threadsafe`; so tokio's threads
//! never take the GIL. Work
//! that takes time (tokenizing, detokenizing, model loading) runs on tokio's blocking pool; the
//! QUIC connections are driven by tokio's worker threads ([`runtime`]).
//!
//! Nothing here panics on bad input: every failure becomes a Python exception of a class in
//! `unimic.errors` ([`errors`]).
#![warn(missing_docs)]

mod bridge;
mod client;
mod errors;
mod runtime;
mod server;
mod stack;

use pyo3::prelude::*;

/// The Python module `unimic._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Where the models of the source tree this module was built from are: the last place
    // `unimic.Models` looks (after an explicit path, `$UNIMIC_MODELS` and the package data).
    m.add(
        "SOURCE_MODELS_DIR",
        unimic_codec::shipped::source_models_dir()
            .to_string_lossy()
            .into_owned(),
    )?;
    m.add(
        "REQUEST_MEDIA_TYPE",
        unimic_agents::request::REQUEST_MEDIA_TYPE,
    )?;
    m.add_class::<bridge::Bridge>()?;
    m.add_class::<bridge::Ready>()?;
    m.add_class::<stack::Models>()?;
    m.add_class::<client::Client>()?;
    m.add_class::<client::Reply>()?;
    m.add_class::<server::Server>()?;
    m.add_class::<server::Sink>()?;
    m.add_class::<server::EchoAgent>()?;
    m.add_class::<server::LocalAgent>()?;
    m.add_function(wrap_pyfunction!(client::connect, m)?)?;
    m.add_function(wrap_pyfunction!(server::serve, m)?)?;
    Ok(())
}

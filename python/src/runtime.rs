//! The tokio runtime every session of this process runs on: started on first use, two worker
//! threads (`$UNIMIC_WORKER_THREADS` to change) (QUIC drivers, routing, coding tasks) and a blocking pool whose idle threads leave
//! after a second (tokenizing, detokenizing, model loading).

use std::sync::OnceLock;
use std::time::Duration;

use crate::errors::Failure;

static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();

/// The runtime, started on the first call.
pub fn get() -> Result<&'static tokio::runtime::Runtime, Failure> {
    RUNTIME
        .get_or_init(|| {
            let workers = std::env::var("UNIMIC_WORKER_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n: &usize| n > 0)
                .unwrap_or(2);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("unimic-tokio")
                .thread_keep_alive(Duration::from_secs(1))
                .enable_all()
                .build()
                .map_err(|e| format!("starting the tokio runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| Failure::new("UnimicError", e.clone()))
}

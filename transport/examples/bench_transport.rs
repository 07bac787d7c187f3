//! The transport benchmark without the CLI (and so without candle):
//!
//! ```text
//! cargo run -p unimic-transport --features bench --release --example bench_transport -- \
//!     [TURNS] [IDLE_SESSIONS] [--turns N] [--grid-turns N] [--idle N] [--workers N] \
//!     [--payloads text,grid256,grid512] [--json]
//! ```
//!
//! Prints the same JSON lines as `unimic bench transport --json` (`--json` is accepted and
//! changes nothing: the output is always JSON lines; `--payloads ''` runs only the idle-session
//! measurement). The idle-session RSS here covers one
//! process holding both the clients and the server. Defaults: 100 turns (10 for grids), 1000 idle
//! sessions, every payload, 2 runtime worker threads.

use unimic_transport::bench::{self, BenchConfig};
use unimic_transport::tls::ServerTls;
use unimic_transport::{Server, ServerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = BenchConfig::default();
    let mut idle: usize = 1000;
    let mut workers: usize = 2;
    let mut positional = 0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--json" => {}
            "--turns" => config.turns = value("--turns")?.parse()?,
            "--grid-turns" => config.grid_turns = value("--grid-turns")?.parse()?,
            "--idle" => idle = value("--idle")?.parse()?,
            "--workers" => workers = value("--workers")?.parse::<usize>()?.max(1),
            "--payloads" => {
                config.payloads = value("--payloads")?
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            other if !other.starts_with("--") && positional == 0 => {
                config.turns = other.parse()?;
                positional += 1;
            }
            other if !other.starts_with("--") && positional == 1 => {
                idle = other.parse()?;
                positional += 1;
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    rt.block_on(async {
        if !config.payloads.is_empty() {
            for row in bench::run(&config).await? {
                println!("{}", serde_json::to_string(&row)?);
            }
        }
        if idle > 0 {
            let tls = ServerTls::self_signed()?;
            let pin = tls.identity.cert_hash();
            let mut config = ServerConfig::new(tls);
            config.max_pending_handshakes = 4096;
            let mut server = Server::bind(config)?;
            let addr = server.local_addr()?;
            let holder = tokio::spawn(async move {
                let mut held = Vec::new();
                while let Some(s) = server.accept().await {
                    held.push(s);
                }
            });
            let report = bench::idle_sessions(addr, pin, idle, None).await?;
            println!("{}", serde_json::to_string(&report)?);
            holder.abort();
        }
        Ok(())
    })
}

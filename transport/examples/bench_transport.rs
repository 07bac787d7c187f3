//! The transport benchmark without the CLI (and so without candle):
//! `cargo run -p unimic-transport --features bench --release --example bench_transport -- [TURNS] [IDLE_SESSIONS]`.
//! Prints the same JSON lines as `unimic bench transport --json`; the idle-session RSS here covers
//! one process holding both the clients and the server.

use unimic_transport::bench::{self, BenchConfig};
use unimic_transport::tls::ServerTls;
use unimic_transport::{Server, ServerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let turns: usize = args.next().map_or(Ok(100), |a| a.parse())?;
    let idle: usize = args.next().map_or(Ok(1000), |a| a.parse())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut config = BenchConfig::default();
        config.turns = turns;
        for row in bench::run(&config).await? {
            println!("{}", serde_json::to_string(&row)?);
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

//! The benchmark harness runs end to end (tiny sizes; timings are not checked here).
#![cfg(feature = "bench")]

use unimic_transport::bench::{self, BenchConfig};
use unimic_transport::tls::ServerTls;
use unimic_transport::{Server, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_rows_cover_every_transport() {
    let mut config = BenchConfig::quick();
    config.payloads = vec!["text".into()];
    let rows = bench::run(&config).await.unwrap();
    let names: Vec<(&str, &str)> = rows.iter().map(|r| (r.transport, r.coding)).collect();
    assert_eq!(
        names,
        vec![
            ("unimic", "tokens"),
            ("unimic", "precoded"),
            ("quinn-echo", "bytes"),
            ("http-json", "bytes")
        ]
    );
    let coded = rows[2].payload_bytes;
    assert!(coded > 0);
    // Every transport carried the same coded bytes; JSON + base64 is larger on the wire.
    assert!(rows.iter().skip(1).all(|r| r.payload_bytes == coded));
    assert!(rows[3].wire_bytes > coded * 4 / 3);
    assert!(rows[0].wire_bytes > rows[0].payload_bytes);
    assert!(rows
        .iter()
        .all(|r| r.rtt_us_p50 > 0.0 && r.msgs_per_s > 0.0));
    // The byte transports also ran alone, and the ratio to the echo is taken from those turns.
    for r in &rows[1..] {
        assert!(r.rtt_us_p50_alone.unwrap() > 0.0, "{r:?}");
        assert!(r.rtt_alone_vs_quinn_echo.unwrap() > 0.0, "{r:?}");
    }
    assert_eq!(rows[2].rtt_alone_vs_quinn_echo, Some(1.0));
    assert_eq!(rows[0].rtt_us_p50_alone, None);
    // CPU per turn is read from /proc on Linux: every line has it, and turns cost CPU.
    if cfg!(target_os = "linux") {
        for r in &rows {
            let cpu = r.cpu_us_per_turn.unwrap();
            let switches = r.ctx_switches_per_turn.unwrap();
            assert!(cpu > 0.0 && switches >= 0.0, "{r:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_all_established() {
    let tls = ServerTls::self_signed().unwrap();
    let pin = tls.identity.cert_hash();
    let mut server = Server::bind(ServerConfig::new(tls)).unwrap();
    let addr = server.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(s) = server.accept().await {
            held.push(s);
        }
    });
    let report = bench::idle_sessions(addr, pin, 20, None).await.unwrap();
    assert_eq!(report.established, 20);
    holder.abort();
}

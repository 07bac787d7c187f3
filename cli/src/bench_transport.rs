//! `unimic bench transport`: unimic sessions against a plain quinn echo and HTTP/1.1 + JSON +
//! base64 on loopback, plus how many idle sessions one server holds and its memory per session.
//!
//! The idle-session server runs in a child process (this binary with `--idle-server`), so its
//! resident set size is measured alone, without the clients.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use anyhow::{anyhow, Context};
use unimic_transport::bench::{self, BenchConfig, BenchRow, IdleReport};
use unimic_transport::tls::CertHash;

/// Arguments of `unimic bench transport`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Sequential turns per payload and transport (after 5 warm-up turns).
    #[arg(long, default_value_t = 100)]
    pub turns: usize,
    /// Turns in flight for the throughput measurement.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Turns per in-flight worker for the throughput measurement.
    #[arg(long, default_value_t = 10)]
    pub throughput_turns: usize,
    /// Payloads: any of text, grid256, grid512.
    #[arg(long, value_delimiter = ',', default_value = "text,grid256,grid512")]
    pub payloads: Vec<String>,
    /// Worker threads of the tokio runtime that runs both ends (1: everything on one thread).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Idle sessions to open against one server (0 skips the measurement).
    #[arg(long, default_value_t = 1000)]
    pub idle_sessions: usize,
    /// Internal: run the idle-session server (the benchmark starts it as a child process).
    #[arg(long, hide = true)]
    pub idle_server: bool,
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.workers))
        .enable_all()
        .build()?;
    if args.idle_server {
        return rt.block_on(bench::idle_server()).map_err(Into::into);
    }
    let mut config = BenchConfig::default();
    config.turns = args.turns.max(1);
    config.concurrency = args.concurrency.max(1);
    config.throughput_turns = args.throughput_turns.max(1);
    config.payloads = args.payloads.clone();
    let rows = rt.block_on(bench::run(&config))?;
    print_rows(&rows, args.json)?;
    if args.idle_sessions > 0 {
        let report = rt.block_on(idle(args.idle_sessions))?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "\nidle sessions: {} of {} established in {:.2} s; server RSS {:.1} MiB -> {:.1} MiB, \
                 {:.1} KiB per session ({})",
                report.established,
                report.sessions,
                report.open_seconds,
                report.rss_before_bytes as f64 / 1048576.0,
                report.rss_after_bytes as f64 / 1048576.0,
                report.rss_per_session_bytes / 1024.0,
                report.scope
            );
        }
    }
    Ok(())
}

fn print_rows(rows: &[BenchRow], json: bool) -> anyhow::Result<()> {
    if json {
        for r in rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "{:<11} {:<9} {:<9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>9} {:>7} {:>7}",
        "transport",
        "payload",
        "coding",
        "payload_B",
        "wire_B",
        "p50_us",
        "p99_us",
        "msgs/s",
        "bits/tok",
        "vs_echo",
        "alone"
    );
    for r in rows {
        println!(
            "{:<11} {:<9} {:<9} {:>9} {:>10} {:>10.0} {:>10.0} {:>10.0} {:>9} {:>7} {:>7}",
            r.transport,
            r.payload,
            r.coding,
            r.payload_bytes,
            r.wire_bytes,
            r.rtt_us_p50,
            r.rtt_us_p99,
            r.msgs_per_s,
            r.bits_per_token.map_or("-".into(), |b| format!("{b:.2}")),
            r.rtt_p50_vs_quinn_echo
                .map_or("-".into(), |x| format!("{x:.2}")),
            r.rtt_alone_vs_quinn_echo
                .map_or("-".into(), |x| format!("{x:.2}")),
        );
    }
    Ok(())
}

/// Starts this binary with `args` as a server in a child process that prints `ADDR PIN` as its
/// first line; returns the child and what it printed.
pub fn start_child_server(
    args: &[&str],
    what: &str,
) -> anyhow::Result<(std::process::Child, SocketAddr, CertHash)> {
    let exe = std::env::current_exe().context("locating the unimic binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting the {what}"))?;
    let read = (|| {
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let mut it = line.split_whitespace();
        let addr: SocketAddr = it.next().ok_or_else(|| anyhow!("no address"))?.parse()?;
        let pin: CertHash = it
            .next()
            .ok_or_else(|| anyhow!("no certificate hash"))?
            .parse()?;
        Ok::<_, anyhow::Error>((addr, pin))
    })();
    match read {
        Ok((addr, pin)) => Ok((child, addr, pin)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e.context(format!("reading the {what}'s address")))
        }
    }
}

/// Starts the idle-session server as a child process and opens `n` sessions against it.
async fn idle(n: usize) -> anyhow::Result<IdleReport> {
    let (mut child, addr, pin) = start_child_server(
        &["bench", "transport", "--idle-server"],
        "idle-session server",
    )?;
    let result = bench::idle_sessions(addr, pin, n, Some(child.id()))
        .await
        .map_err(Into::into);
    let _ = child.kill();
    let _ = child.wait();
    result
}

//! The `unimic` command-line tool.

use clap::{Parser, Subcommand};

mod bench_codec;
mod bench_e2e;
mod bench_soak;
mod bench_tokenizer;
mod bench_transport;
mod bench_umic;
mod chat;
mod decode;
mod demo;
mod encode;
mod models;
mod openai;
mod serve;
mod tokenize;
mod train_entropy;
mod train_tokenizer;

/// unimic: token-based multimodal coding between edge devices and cloud AI agents.
#[derive(Parser)]
#[command(name = "unimic", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process; boxing the larger argument structs would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Measure codecs, tokenizers and transports; one JSON object per line with --json.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Encode an image to entropy-coded tokens in a `.umic` file.
    Encode(encode::Args),
    /// Decode a `.umic` file back to an image.
    Decode(decode::Args),
    /// Tokenize images whole into token-grid files, one per grid shape.
    Tokenize(tokenize::Args),
    /// Answer chat sessions over QUIC with an agent; prints the address and pin to connect.
    Serve(serve::Args),
    /// A terminal chat with a `unimic serve` server.
    Chat(chat::Args),
    /// A scripted chat-with-images session over loopback QUIC, with a per-turn table of bytes
    /// (unimic vs OpenAI-style JSON + base64) and an HTML report.
    Demo(demo::Args),
    /// Train the project's models on ../shared/data.
    Train {
        #[command(subcommand)]
        what: TrainCommand,
    },
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum BenchCommand {
    /// Entropy models on token grids, images or captions.
    Codec(bench_codec::Args),
    /// The image tokenizer against JPEG/WebP/AVIF/JPEG XL at equal bytes.
    Tokenizer(bench_tokenizer::Args),
    /// unimic over QUIC against a plain quinn echo and HTTP+JSON.
    Transport(bench_transport::Args),
    /// The demo's turns end to end (bytes against JSON + base64, time), and a streamed reply's
    /// per-delta latency against SSE over HTTP.
    E2e(bench_e2e::Args),
    /// Many concurrent chat sessions against one server: messages lost, turn times, server RSS
    /// and CPU.
    Soak(bench_soak::Args),
    /// Images through `.umic` files end to end (tokenizer and entropy coding): bytes, bits per
    /// pixel, encode and decode time.
    Umic(bench_umic::Args),
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum TrainCommand {
    /// The VQ image tokenizer.
    Tokenizer(train_tokenizer::Args),
    /// The transformer entropy models.
    Entropy(train_entropy::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { what } => match what {
            BenchCommand::Codec(a) => bench_codec::run(a),
            BenchCommand::Tokenizer(a) => bench_tokenizer::run(a),
            BenchCommand::Transport(a) => bench_transport::run(a),
            BenchCommand::E2e(a) => bench_e2e::run(a),
            BenchCommand::Soak(a) => bench_soak::run(a),
            BenchCommand::Umic(a) => bench_umic::run(a),
        },
        Command::Encode(a) => encode::run(a),
        Command::Decode(a) => decode::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Train { what } => match what {
            TrainCommand::Tokenizer(a) => train_tokenizer::run(a),
            TrainCommand::Entropy(a) => train_entropy::run(a),
        },
    }
}

//! Where the coding time of a benchmark turn goes, per call of the codec facade the session uses
//! (not a benchmark of the transport; the numbers explain the `coding: "tokens"` rows of
//! `bench_transport`):
//!
//! ```text
//! cargo run -p unimic-transport --features bench --release --example coding_cost
//! ```
//!
//! Prints the mean time of: building the adaptive text and grid models, encoding / preparing
//! to decode / decoding the benchmark's text prompt, and encoding and decoding its 256×256 grid
//! with the adaptive grid model (chunks of 16,384 tokens, as the benchmark sends it) and with
//! the uniform model for comparison. A turn codes each part four times: encode and decode on
//! the way out, again on the way back.

use std::time::Instant;

use unimic_codec::context::SessionContext;
use unimic_codec::entropy::{AdaptiveGrid, AdaptiveText};
use unimic_codec::part::{ModelChoice, PartCodec, PartShape, PartSpec, PartTokens};
use unimic_codec::text::{O200k, TextTokenizer};
use unimic_transport::bench::{synthetic_grid, PROMPT};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Runs `f` once to warm up, then `n` times; prints the mean and returns the last result.
fn time<T>(what: &str, n: usize, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut out = f()?;
    let t = Instant::now();
    for _ in 0..n {
        out = f()?;
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("{what:44} {us:12.1} us");
    Ok(out)
}

fn main() -> Result<()> {
    let ctx = SessionContext::new(1 << 20);
    let mut codec = PartCodec::default();
    time("AdaptiveText::new (o200k id space)", 2000, || {
        Ok(AdaptiveText::new(200_019))
    })?;
    time("AdaptiveGrid::new (codebook 1024)", 2000, || {
        Ok(AdaptiveGrid::new(1024))
    })?;

    let ids = O200k::new().encode(PROMPT);
    let spec = PartSpec::new(ModelChoice::Adaptive).with_chunk_tokens(4096);
    let label = format!("text encode ({} tokens)", ids.len());
    let part = time(&label, 2000, || {
        Ok(codec.encode(&ctx, PartTokens::Text(&ids), &spec)?)
    })?;
    let shape = PartShape::Text {
        count: ids.len() as u64,
    };
    let dec = time("text decoder (per chunk in the session)", 2000, || {
        Ok(codec.decoder(&ctx, shape, &spec, &part.digest, &part.model)?)
    })?;
    let payload = part.chunks.first().ok_or("no chunk")?.payload.clone();
    time("text decode_chunk", 2000, || {
        Ok(dec.decode_chunk(0, &payload)?)
    })?;

    let grid = synthetic_grid(256)?;
    for model in [ModelChoice::Adaptive, ModelChoice::Uniform] {
        let spec = PartSpec::new(model).with_chunk_tokens(16_384);
        let label = format!("grid256 encode ({model:?})");
        let part = time(&label, 3, || {
            Ok(codec.encode(&ctx, PartTokens::Grid(&grid), &spec)?)
        })?;
        let shape = PartShape::Grid {
            height: 256,
            width: 256,
            codebook_size: grid.codebook_size(),
        };
        let dec = codec.decoder(&ctx, shape, &spec, &part.digest, &part.model)?;
        let label = format!("grid256 decode, 4 chunks ({model:?})");
        time(&label, 3, || {
            for (i, c) in part.chunks.iter().enumerate() {
                dec.decode_chunk(i as u64, &c.payload)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

//! `unimic encode IMAGE -o FILE.umic`: an image to entropy-coded tokens in a `.umic` file.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use unimic_codec::tokenizer::ImageTokenizer;
use unimic_codec::umic::{self, EncodeOptions, Level1Model};

use crate::models;

/// Arguments of `unimic encode`.
#[derive(clap::Args)]
pub struct Args {
    /// The image to encode (PNG, JPEG or WebP).
    pub image: PathBuf,
    /// Where to write the `.umic` file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Resize the shorter side to SIZE and center-crop to SIZE×SIZE first (0 = keep the size;
    /// `--max-side` applies after either).
    #[arg(long, default_value_t = 0)]
    pub size: u32,
    /// Scale down, keeping the aspect ratio, so that neither side exceeds MAX_SIDE pixels
    /// (0 = never). 1024 keeps the grid within the transformer models' 64×64 positions and the
    /// tokenizer's 4,096-token limit; a phone photo (4032×3024) becomes 1024×768.
    #[arg(long, default_value_t = 1024)]
    pub max_side: u32,
    /// Tokenizer directory (manifest.json + tokenizer.safetensors); default: the shipped one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Tokens per independently decodable chunk (0 = one chunk; only the adaptive model chunks).
    #[arg(long, default_value_t = 0)]
    pub chunk_tokens: u32,
    /// Entropy model: `auto` takes the shipped generic transformer when it is present, fits the
    /// grid and no chunking is asked for, and the adaptive context model otherwise.
    #[arg(long, value_enum, default_value_t = Entropy::Auto)]
    pub entropy: Entropy,
    /// Folder of the transformer entropy models (default: the shipped `models/entropy`).
    #[arg(long)]
    pub entropy_dir: Option<PathBuf>,
    /// Quality ladder: how many levels to send (1 = the base grid only; up to the tokenizer's
    /// levels). Level 1 is coded with the generic transformer (or adaptive model), each further
    /// level with its own trained ladder model.
    #[arg(long, default_value_t = 1, conflicts_with = "bytes")]
    pub quality: usize,
    /// Send as many ladder levels as fit in a file of at most BYTES bytes (at least level 1;
    /// an error when even level 1 does not fit).
    #[arg(long)]
    pub bytes: Option<usize>,
    /// Rate-distortion trade-off of the level-1 codes when the generic transformer codes them:
    /// the weight of a bit against the image's mean quantization error (0 writes the nearest
    /// codes; the default saves about 3% of the bytes for 0.03 dB; see docs/CODING.md §7.12).
    #[arg(long, default_value_t = unimic_codec::rdo::DEFAULT_LAMBDA)]
    pub rdo: f32,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The entropy model `unimic encode` codes the tokens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Entropy {
    /// The best available (see `--entropy`).
    Auto,
    /// The adaptive context-mixing model (no weights; chunkable).
    Adaptive,
    /// The shipped generic transformer (`unimic-entropy-generic-v11`, trained on the default tokenizer's level-1 tokens).
    Generic,
}

/// Runs `unimic encode`.
pub fn run(args: Args) -> anyhow::Result<()> {
    models::check_input_file(&args.image)?;
    models::check_output_file(&args.output)?;
    anyhow::ensure!(
        args.rdo.is_finite() && args.rdo >= 0.0,
        "--rdo {}: give a number >= 0 (0 keeps the nearest codes)",
        args.rdo
    );
    let image = image::open(&args.image)
        .with_context(|| format!("reading {}", args.image.display()))?
        .to_rgb8();
    let image = models::fit(models::prepare(image, args.size), args.max_side);
    let generic = match args.entropy {
        Entropy::Adaptive => None,
        Entropy::Generic => Some(
            models::generic_model(args.entropy_dir.as_deref(), models::GENERIC_ID)?.with_context(
                || {
                    format!(
                        "no {} model in {}",
                        models::GENERIC_ID,
                        models::entropy_dir(args.entropy_dir.as_deref()).display()
                    )
                },
            )?,
        ),
        Entropy::Auto if args.chunk_tokens != 0 => None,
        Entropy::Auto => models::generic_model(args.entropy_dir.as_deref(), models::GENERIC_ID)?,
    };
    let generic = generic.map(|(g, m)| (Arc::new(g), m));
    // The level-1 codes are chosen for the generic model's bits only when it codes them.
    let tokenizer_dir = args
        .tokenizer
        .clone()
        .unwrap_or_else(unimic_codec::tokenizer::default_dir);
    let rdo_model = generic.as_ref().map(|(g, _)| g.clone());
    let (tokenizer, rdo) = unimic_codec::rdo::load_dir(
        &tokenizer_dir,
        rdo_model,
        unimic_codec::rdo::RdoConfig::with_lambda(args.rdo),
    )
    .with_context(|| format!("loading tokenizer from {}", tokenizer_dir.display()))?;
    let options = EncodeOptions::default()
        .with_levels(args.quality)
        .with_max_bytes(args.bytes)
        .with_chunk_tokens(args.chunk_tokens)
        .with_model(match args.entropy {
            Entropy::Auto => Level1Model::Auto,
            Entropy::Adaptive => Level1Model::Adaptive,
            Entropy::Generic => Level1Model::Generic,
        });
    let encoded = umic::encode_image(
        &tokenizer,
        &image,
        generic.as_ref().map(|(g, m)| (m.id.as_str(), &**g)),
        &models::entropy_dir(args.entropy_dir.as_deref()),
        &options,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{e} (encoding the {}×{} px image; see --quality, --bytes, --size, --max-side)",
            image.width(),
            image.height()
        )
    })?;
    if let (Some(side), false) = (encoded.exceeds_generic, args.json) {
        eprintln!(
            "note: the {}x{} token grid exceeds the {} model's {side}x{side} positions, so the \
             adaptive model codes it; --max-side {} keeps an image within them",
            encoded.grid.height(),
            encoded.grid.width(),
            models::GENERIC_ID,
            side * tokenizer.factor()
        );
    }
    let (file, bytes, bits, grid) = (
        encoded.file,
        encoded.bytes,
        encoded.level1_bits,
        encoded.grid,
    );
    // λ in force: the tokenizer was wrapped and the generic model coded level 1 (a grid too
    // large for it kept the nearest codes).
    let rdo_lambda = match rdo {
        Some(cfg)
            if generic
                .as_ref()
                .is_some_and(|(_, m)| m.id == file.model.name) =>
        {
            // As given (0.02, not the f32's 0.0199999995…).
            cfg.lambda.to_string().parse::<f64>().unwrap_or(0.0)
        }
        _ => 0.0,
    };
    let level_bytes: Vec<usize> = std::iter::once(file.level1_payload_bytes())
        .chain(
            file.levels
                .iter()
                .map(|l| l.chunks.iter().map(|(_, p)| p.len()).sum()),
        )
        .collect();
    let total_bits = bits + 8 * (file.payload_bytes() - file.level1_payload_bytes()) as u64;
    std::fs::write(&args.output, &bytes)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let pixels = f64::from(image.width()) * f64::from(image.height());
    let summary = serde_json::json!({
        "image": args.image.display().to_string(),
        "output": args.output.display().to_string(),
        "width": image.width(),
        "height": image.height(),
        "grid": [grid.height(), grid.width()],
        "codebook_size": grid.codebook_size(),
        "tokenizer": tokenizer.id().name,
        "entropy_model": file.model.name,
        // λ of the level-1 codes' choice (0: the nearest codes, as without the generic model).
        "rdo_lambda": rdo_lambda,
        "tokens": grid.len(),
        "levels": 1 + file.levels.len(),
        "level_payload_bytes": level_bytes,
        "payload_bytes": file.payload_bytes(),
        "file_bytes": bytes.len(),
        "bits_per_token": bits as f64 / grid.len() as f64,
        "raw_bits_per_token": f64::from(grid.codebook_size()).log2(),
        "bpp_level1": bits as f64 / pixels,
        "bpp_payload": total_bits as f64 / pixels,
        "bpp_file": 8.0 * bytes.len() as f64 / pixels,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} → {}: {}×{} px, {} level(s) of {}×{} tokens (K={}), {} payload bytes + {} bytes header = {} bytes; level 1 {:.3} bits/token (raw {:.2}), {:.4} bpp ({:.4} bpp with header)",
            args.image.display(),
            args.output.display(),
            image.width(),
            image.height(),
            1 + file.levels.len(),
            grid.height(),
            grid.width(),
            grid.codebook_size(),
            file.payload_bytes(),
            bytes.len() - file.payload_bytes(),
            bytes.len(),
            bits as f64 / grid.len() as f64,
            f64::from(grid.codebook_size()).log2(),
            total_bits as f64 / pixels,
            8.0 * bytes.len() as f64 / pixels,
        );
    }
    Ok(())
}

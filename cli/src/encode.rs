//! `unimic encode IMAGE -o FILE.umic`: an image to entropy-coded tokens in a `.umic` file.

use std::path::PathBuf;

use anyhow::{bail, Context};
use unimic_codec::context::SessionContext;
use unimic_codec::entropy::ladder::LadderModel;
use unimic_codec::part::{ModelChoice, PartCodec, PartSpec, PartTokens};
use unimic_codec::tokenizer::ImageTokenizer;
use unimic_codec::umic::{hash8, Level, ModelTag, UmicFile};

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
    /// The shipped generic transformer (`unimic-entropy-generic-v7`, trained on the default tokenizer's level-1 tokens).
    Generic,
}

/// Runs `unimic encode`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let tokenizer = models::tokenizer(args.tokenizer.as_deref())?;
    let image = image::open(&args.image)
        .with_context(|| format!("reading {}", args.image.display()))?
        .to_rgb8();
    let image = models::fit(models::prepare(image, args.size), args.max_side);
    let levels_wanted = match args.bytes {
        Some(_) => tokenizer.levels(),
        None => args.quality,
    };
    if levels_wanted == 0 || levels_wanted > tokenizer.levels() {
        bail!(
            "--quality {levels_wanted}: the tokenizer {:?} has levels 1..={}",
            tokenizer.id().name,
            tokenizer.levels()
        );
    }
    let mut grids = tokenizer
        .encode_levels(&image, levels_wanted)
        .with_context(|| {
            format!(
                "tokenizing the {}×{} px image (a smaller --max-side scales it down)",
                image.width(),
                image.height()
            )
        })?;
    let refinements = grids.split_off(1);
    let grid = grids.remove(0);
    let generic = match args.entropy {
        Entropy::Adaptive => None,
        Entropy::Generic => {
            if args.chunk_tokens != 0 {
                bail!("--entropy generic codes one chunk; drop --chunk-tokens");
            }
            let m = models::generic_model(args.entropy_dir.as_deref(), models::GENERIC_ID)?
                .with_context(|| {
                    format!(
                        "no {} model in {}",
                        models::GENERIC_ID,
                        models::entropy_dir(args.entropy_dir.as_deref()).display()
                    )
                })?;
            Some(m)
        }
        Entropy::Auto if args.chunk_tokens != 0 => None,
        Entropy::Auto => models::generic_model(args.entropy_dir.as_deref(), models::GENERIC_ID)?
            .filter(|(g, _)| {
                let side = g.config().max_side as u32;
                let fits = grid.height() <= side && grid.width() <= side;
                if !fits && !args.json {
                    eprintln!(
                        "note: the {}x{} token grid exceeds the {} model's {side}x{side} \
                         positions, so the adaptive model codes it; --max-side {} keeps an \
                         image within them",
                        grid.height(),
                        grid.width(),
                        models::GENERIC_ID,
                        side * tokenizer.factor()
                    );
                }
                fits && grid.codebook_size() as usize == g.config().codebook_size
            }),
    };
    let (model, chunks, bits) = match &generic {
        Some((g, manifest)) => {
            let payload = g.encode(&grid)?;
            let bits = 8 * payload.len() as u64;
            (
                ModelTag {
                    name: manifest.id.clone(),
                    version: 1,
                    hash: models::hex_hash8(&manifest.sha256)?,
                },
                vec![(grid.len() as u64, payload)],
                bits,
            )
        }
        None => {
            let mut codec = PartCodec::default();
            let ctx = SessionContext::default();
            let spec = PartSpec::new(ModelChoice::Adaptive).with_chunk_tokens(args.chunk_tokens);
            let part = codec.encode(&ctx, PartTokens::Grid(&grid), &spec)?;
            (
                ModelTag {
                    name: models::entropy_name(part.model.id).to_string(),
                    version: u64::from(part.model.version),
                    hash: hash8(&part.model.hash),
                },
                part.chunks
                    .iter()
                    .map(|c| (u64::from(c.tokens), c.payload.clone()))
                    .collect(),
                part.bits,
            )
        }
    };
    let ladder_dir = models::entropy_dir(args.entropy_dir.as_deref());
    let mut levels = Vec::with_capacity(refinements.len());
    for (i, g) in refinements.iter().enumerate() {
        let level = i + 2;
        let m = LadderModel::load(&ladder_dir, level, 1)
            .with_context(|| format!("loading the entropy model of ladder level {level}"))?;
        let payload = m.encode(g)?;
        levels.push(Level {
            model: ModelTag {
                name: m.id(),
                version: m.version(),
                hash: hash8(&m.content_hash()),
            },
            chunks: vec![(g.len() as u64, payload)],
        });
    }
    let mut file = UmicFile {
        tokenizer: ModelTag {
            name: tokenizer.id().name.clone(),
            version: 1,
            hash: models::tokenizer_hash8(&tokenizer)?,
        },
        model,
        image_width: u64::from(image.width()),
        image_height: u64::from(image.height()),
        grid_height: u64::from(grid.height()),
        grid_width: u64::from(grid.width()),
        codebook_size: u64::from(grid.codebook_size()),
        chunks,
        levels,
    };
    let mut bytes = file.to_bytes();
    if let Some(limit) = args.bytes {
        while bytes.len() > limit && !file.levels.is_empty() {
            file.levels.pop();
            bytes = file.to_bytes();
        }
        if bytes.len() > limit {
            bail!(
                "--bytes {limit}: even level 1 alone takes {} bytes (a smaller --size or \
                 --max-side makes fewer tokens)",
                bytes.len()
            );
        }
    }
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

//! `unimic decode FILE.umic -o OUT.png`: a `.umic` file back to an image.

use std::path::PathBuf;

use anyhow::{bail, Context};
use unimic_codec::context::SessionContext;
use unimic_codec::entropy::ladder::LadderModel;
use unimic_codec::grid::TokenGrid;
use unimic_codec::part::{DecodedPart, PartCodec, PartShape, PartSpec};
use unimic_codec::tokenizer::{ImageTokenizer, MAX_TOKENS};
use unimic_codec::umic::{hash8, UmicFile};

use crate::models;

/// Arguments of `unimic decode`.
#[derive(clap::Args)]
pub struct Args {
    /// The `.umic` file.
    pub input: PathBuf,
    /// Where to write the decoded image (format from the extension, e.g. .png).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Tokenizer directory; default: the shipped one. Must be the one the file was encoded with.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Folder of the transformer entropy models (default: the shipped `models/entropy`).
    #[arg(long)]
    pub entropy_dir: Option<PathBuf>,
    /// Decode only the first N levels of a quality-ladder file (0 = all it carries).
    #[arg(long, default_value_t = 0)]
    pub levels: usize,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs `unimic decode`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let file = UmicFile::from_bytes(&bytes)
        .with_context(|| format!("parsing {}", args.input.display()))?;
    let tokenizer = models::tokenizer_for(
        args.tokenizer.as_deref(),
        &file.tokenizer.name,
        file.tokenizer.hash,
    )?;
    let tokens = file.grid_height * file.grid_width;
    if tokens > MAX_TOKENS as u64 {
        bail!(
            "the file declares a {}×{} grid ({tokens} tokens); tokenizers here decode at most {MAX_TOKENS}",
            file.grid_height,
            file.grid_width
        );
    }
    let shape = PartShape::Grid {
        height: u32::try_from(file.grid_height)?,
        width: u32::try_from(file.grid_width)?,
        codebook_size: u32::try_from(file.codebook_size)?,
    };
    if file.codebook_size != u64::from(tokenizer.codebook_size()) {
        bail!(
            "the file's codebook size {} differs from the tokenizer's {}",
            file.codebook_size,
            tokenizer.codebook_size()
        );
    }
    let grid = if file.model.name.starts_with("unimic-entropy-") {
        decode_transformer(&args, &file, shape)?
    } else {
        decode_builtin(&file, shape)?
    };
    let keep = if args.levels == 0 {
        file.levels.len()
    } else {
        args.levels.saturating_sub(1).min(file.levels.len())
    };
    let mut grids = vec![grid];
    for (i, level) in file.levels.iter().take(keep).enumerate() {
        grids.push(decode_level(&args, i + 2, level, shape)?);
    }
    let grid = &grids[0];
    let image = tokenizer.decode_levels_to(
        &grids,
        u32::try_from(file.image_width)?,
        u32::try_from(file.image_height)?,
    )?;
    image
        .save(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let summary = serde_json::json!({
        "input": args.input.display().to_string(),
        "output": args.output.display().to_string(),
        "width": image.width(),
        "height": image.height(),
        "grid": [grid.height(), grid.width()],
        "tokens": grid.len(),
        "levels_in_file": 1 + file.levels.len(),
        "levels_decoded": grids.len(),
        "file_bytes": bytes.len(),
        "entropy_model": file.model.name,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} → {}: {}×{} px from {} level(s) of {} tokens (of {} in the file; {} bytes)",
            args.input.display(),
            args.output.display(),
            image.width(),
            image.height(),
            grids.len(),
            grid.len(),
            1 + file.levels.len(),
            bytes.len()
        );
    }
    Ok(())
}

/// Decodes refinement level `level` of a ladder file with the shipped ladder model it names.
fn decode_level(
    args: &Args,
    level: usize,
    l: &unimic_codec::umic::Level,
    shape: PartShape,
) -> anyhow::Result<TokenGrid> {
    let PartShape::Grid { height, width, .. } = shape else {
        bail!("not a grid");
    };
    let dir = models::entropy_dir(args.entropy_dir.as_deref());
    let m = LadderModel::load(&dir, level, l.model.version).with_context(|| {
        format!(
            "level {level} needs entropy model {:?} (version {}), which is not in {}",
            l.model.name,
            l.model.version,
            dir.display()
        )
    })?;
    if m.id() != l.model.name || hash8(&m.content_hash()) != l.model.hash {
        bail!(
            "level {level}'s entropy model {:?} has hash {}, ours ({}) has {}",
            l.model.name,
            hex8(&l.model.hash),
            m.id(),
            hex8(&hash8(&m.content_hash()))
        );
    }
    let [(tokens, payload)] = l.chunks.as_slice() else {
        bail!(
            "a ladder level has exactly one chunk, level {level} has {}",
            l.chunks.len()
        );
    };
    if *tokens != u64::from(height) * u64::from(width) {
        bail!("level {level}'s chunk declares {tokens} tokens for a {height}×{width} grid");
    }
    Ok(m.decode(height, width, payload)?)
}

/// Decodes a file coded by a shipped transformer model (one chunk, model named by its id and
/// identified by its weights' hash).
fn decode_transformer(args: &Args, file: &UmicFile, shape: PartShape) -> anyhow::Result<TokenGrid> {
    let PartShape::Grid { height, width, .. } = shape else {
        bail!("not a grid");
    };
    let (model, manifest) = models::generic_model(args.entropy_dir.as_deref(), &file.model.name)?
        .with_context(|| {
        format!(
            "the file needs entropy model {:?}, which is not in {}",
            file.model.name,
            models::entropy_dir(args.entropy_dir.as_deref()).display()
        )
    })?;
    if models::hex_hash8(&manifest.sha256)? != file.model.hash || file.model.version != 1 {
        bail!(
            "the file's entropy model {:?} has hash {} (version {}), ours has {} (version 1)",
            file.model.name,
            hex8(&file.model.hash),
            file.model.version,
            &manifest.sha256[..16]
        );
    }
    let [(tokens, payload)] = file.chunks.as_slice() else {
        bail!(
            "a {} file has exactly one chunk, this one has {}",
            file.model.name,
            file.chunks.len()
        );
    };
    if *tokens != u64::from(height) * u64::from(width) {
        bail!("the chunk declares {tokens} tokens for a {height}×{width} grid");
    }
    Ok(model.decode(height, width, payload)?)
}

/// Decodes a file coded by a built-in (weightless) model through the part codec.
fn decode_builtin(file: &UmicFile, shape: PartShape) -> anyhow::Result<TokenGrid> {
    let choice = models::entropy_choice(&file.model.name)
        .with_context(|| format!("unknown entropy model {:?}", file.model.name))?;
    let mut codec = PartCodec::default();
    let ctx = SessionContext::default();
    let chunk_tokens = match file.chunks.as_slice() {
        [] => bail!("the file has no chunks"),
        [_] => 0,
        [(first, _), ..] => u32::try_from(*first)?,
    };
    let spec = PartSpec::new(choice).with_chunk_tokens(chunk_tokens);
    let identity = codec.identity(choice, unimic_codec::context::SequenceKind::Grid)?;
    if hash8(&identity.hash) != file.model.hash || u64::from(identity.version) != file.model.version
    {
        bail!(
            "the file's entropy model {:?} differs from ours (hash or version)",
            file.model.name
        );
    }
    let digest = ctx.digest(&[])?;
    let decoder = codec.decoder(&ctx, shape, &spec, &digest, &identity)?;
    if decoder.chunks() != file.chunks.len() as u64 {
        bail!(
            "the file has {} chunks where its shape implies {}",
            file.chunks.len(),
            decoder.chunks()
        );
    }
    for (i, (tokens, _)) in file.chunks.iter().enumerate() {
        let (start, end) = decoder.chunk_range(i as u64)?;
        if end - start != *tokens {
            bail!(
                "chunk {i} declares {tokens} tokens where the chunking implies {}",
                end - start
            );
        }
    }
    match decoder.decode_all(file.chunks.iter().map(|(_, p)| p.as_slice()))? {
        DecodedPart::Grid(g) => Ok(g),
        other => bail!("decoded a {other:?} where a grid was expected"),
    }
}

fn hex8(h: &[u8; 8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;
    use crate::models::Scratch;

    fn encode_args(out: &std::path::Path, quality: usize, bytes: Option<usize>) -> encode::Args {
        encode::Args {
            image: PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../samples/kodim23.png"
            )),
            output: out.to_path_buf(),
            size: 64,
            max_side: 1024,
            tokenizer: None,
            chunk_tokens: 0,
            entropy: encode::Entropy::Auto,
            entropy_dir: None,
            quality,
            bytes,
            json: true,
        }
    }

    fn decode_args(input: &std::path::Path, out: &std::path::Path, levels: usize) -> Args {
        Args {
            input: input.to_path_buf(),
            output: out.to_path_buf(),
            tokenizer: None,
            entropy_dir: None,
            levels,
            json: true,
        }
    }

    /// The quality ladder through the shipped default tokenizer and models: four levels in a
    /// version 2 file, decoded whole or in part; `--bytes` keeps the levels that fit; a file
    /// naming a tokenizer that is not shipped is refused with its name.
    #[test]
    fn ladder_files_encode_decode_and_name_what_they_need() {
        let dir = Scratch::new("ladder");
        std::fs::create_dir_all(dir.path()).unwrap();
        let f4 = dir.path().join("q4.umic");
        encode::run(encode_args(&f4, 4, None)).unwrap();
        let bytes4 = std::fs::read(&f4).unwrap();
        let file = UmicFile::from_bytes(&bytes4).unwrap();
        assert_eq!(file.levels.len(), 3);
        assert_eq!(bytes4[4], 2, "a ladder file is version 2");
        for levels in [0, 1, 2] {
            let png = dir.path().join(format!("l{levels}.png"));
            run(decode_args(&f4, &png, levels)).unwrap();
            let img = image::open(&png).unwrap();
            assert_eq!((img.width(), img.height()), (64, 64));
        }
        // Level 1 alone is smaller; --bytes between the two keeps fewer than four levels.
        let f1 = dir.path().join("q1.umic");
        encode::run(encode_args(&f1, 1, None)).unwrap();
        let n1 = std::fs::read(&f1).unwrap().len();
        assert!(n1 < bytes4.len());
        let fb = dir.path().join("b.umic");
        encode::run(encode_args(&fb, 1, Some(bytes4.len() - 1))).unwrap();
        let nb = std::fs::read(&fb).unwrap().len();
        assert!(
            nb >= n1 && nb < bytes4.len(),
            "{n1} <= {nb} < {}",
            bytes4.len()
        );
        let err = encode::run(encode_args(&fb, 1, Some(n1 - 1))).unwrap_err();
        assert!(err.to_string().contains("even level 1"), "{err}");
        // A tokenizer nobody here holds: the error names it.
        let mut other = file.clone();
        other.tokenizer.name = "someone-elses-tokenizer".into();
        other.tokenizer.hash = [0xab; 8];
        let fo = dir.path().join("other.umic");
        std::fs::write(&fo, other.to_bytes()).unwrap();
        let err = run(decode_args(&fo, &dir.path().join("o.png"), 0)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("someone-elses-tokenizer") && msg.contains("abababab"),
            "{msg}"
        );
    }
}

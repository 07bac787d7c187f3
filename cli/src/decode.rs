//! `unimic decode FILE.umic -o OUT.png`: a `.umic` file back to an image.

use std::path::PathBuf;

use anyhow::{bail, Context};
use unimic_codec::tokenizer::ImageTokenizer;
use unimic_codec::umic::{self, UmicFile};

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
    models::check_input_file(&args.input)?;
    models::check_output_file(&args.output)?;
    check_image_output(&args.output)?;
    let bytes =
        std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    // The reader bounds the grid by the tokenizers' limit (umic::MAX_GRID_TOKENS).
    let file = UmicFile::from_bytes(&bytes)
        .with_context(|| format!("parsing {}", args.input.display()))?;
    // Names are compared before anything is loaded for them (never made into paths).
    umic::check_names(&file)?;
    let tokenizer = models::tokenizer_for(
        args.tokenizer.as_deref(),
        &file.tokenizer.name,
        file.tokenizer.hash,
    )?;
    umic::check_against(&file, tokenizer.as_ref())?;
    // The generic model a file names is loaded from the entropy folder by the codec.
    let grids = umic::decode_grids(
        tokenizer.as_ref(),
        &file,
        None,
        &models::entropy_dir(args.entropy_dir.as_deref()),
        args.levels,
    )?;
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

/// The output's image format, from its extension, must be one this build writes: checked
/// before the work (`image` would only refuse it when saving the decoded image).
fn check_image_output(path: &std::path::Path) -> anyhow::Result<()> {
    match image::ImageFormat::from_path(path) {
        Ok(f) if f.writing_enabled() => Ok(()),
        _ => bail!(
            "cannot write {}: give it an image extension (.png, .jpg or .webp)",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;
    use crate::models::Scratch;
    use unimic_codec::entropy::ladder::LadderModel;

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
            rdo: unimic_codec::rdo::DEFAULT_LAMBDA,
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

    /// Paths are checked before the work: a missing output directory, an output that is a
    /// directory or has no image extension, an input that is a directory. Each case also names
    /// a tokenizer folder that does not exist, so an error about the path shows that it was
    /// found before anything was loaded.
    #[test]
    fn paths_are_checked_before_the_work() {
        let dir = Scratch::new("cli-paths");
        std::fs::create_dir_all(dir.path()).unwrap();
        let missing = dir.path().join("no-such-dir");
        let no_tokenizer = Some(dir.path().join("no-tokenizer"));
        let msg = |r: anyhow::Result<()>| format!("{:#}", r.unwrap_err());

        let mut a = encode_args(&missing.join("x.umic"), 1, None);
        a.tokenizer = no_tokenizer.clone();
        let e = msg(encode::run(a));
        assert!(
            e.contains("no-such-dir") && e.contains("does not exist"),
            "{e}"
        );
        let mut a = encode_args(dir.path(), 1, None);
        a.tokenizer = no_tokenizer.clone();
        assert!(msg(encode::run(a)).contains("is a directory"));
        let mut a = encode_args(&dir.path().join("x.umic"), 1, None);
        a.image = dir.path().to_path_buf();
        a.tokenizer = no_tokenizer.clone();
        let e = msg(encode::run(a));
        assert!(e.contains("is a directory"), "{e}");

        let input = dir.path().join("in.umic");
        std::fs::write(&input, b"not a umic file").unwrap();
        let mut a = decode_args(&input, &missing.join("x.png"), 0);
        a.tokenizer = no_tokenizer.clone();
        let e = msg(run(a));
        assert!(
            e.contains("no-such-dir") && e.contains("does not exist"),
            "{e}"
        );
        let e = msg(run(decode_args(&input, &dir.path().join("x.umic"), 0)));
        assert!(e.contains("image extension"), "{e}");
        let e = msg(run(decode_args(dir.path(), &dir.path().join("x.png"), 0)));
        assert!(e.contains("is a directory"), "{e}");
        assert!(!dir.path().join("x.png").exists());
    }

    /// Crafted files are refused before any decoding work (the grid and levels against the
    /// tokenizer's limits), and names in a file are compared, never made into paths.
    #[test]
    fn crafted_files_are_refused_before_decoding() {
        let dir = Scratch::new("crafted");
        std::fs::create_dir_all(dir.path()).unwrap();
        let f = dir.path().join("q2.umic");
        encode::run(encode_args(&f, 2, None)).unwrap();
        let good = UmicFile::from_bytes(&std::fs::read(&f).unwrap()).unwrap();
        assert_eq!(good.levels.len(), 1);
        let crafted = dir.path().join("crafted.umic");
        let out = dir.path().join("out.png");
        let refuse = |file: &UmicFile, entropy_dir: Option<&std::path::Path>| -> String {
            std::fs::write(&crafted, file.to_bytes()).unwrap();
            let mut a = decode_args(&crafted, &out, 0);
            a.entropy_dir = entropy_dir.map(|d| d.to_path_buf());
            let e = format!("{:#}", run(a).unwrap_err());
            assert!(!out.exists(), "{e}");
            e
        };
        // The crafted file is otherwise decodable.
        std::fs::write(&crafted, good.to_bytes()).unwrap();
        run(decode_args(&crafted, &dir.path().join("good.png"), 0)).unwrap();

        // A 4096×4096 grid in a hundred-odd bytes, naming no tokenizer held here: the reader
        // refuses it before a tokenizer is looked for.
        let mut huge = good.clone();
        (huge.grid_height, huge.grid_width) = (4096, 4096);
        huge.chunks = vec![(4096 * 4096, vec![0; 8])];
        huge.levels.clear();
        huge.tokenizer.hash = [0xab; 8];
        assert!(huge.to_bytes().len() < 150);
        let e = refuse(&huge, None);
        assert!(e.contains("more than 4096 tokens"), "{e}");

        // More levels than the tokenizer has (each named as its level's model would be).
        let mut deep = good.clone();
        for level in 3..=6 {
            let mut l = good.levels[0].clone();
            l.model.name = LadderModel::id_of(level, 1);
            deep.levels.push(l);
        }
        let e = refuse(&deep, None);
        assert!(e.contains("carries 6 levels") && e.contains("has 4"), "{e}");

        // An image larger than its grid decodes to.
        let mut wide = good.clone();
        wide.image_width = good.grid_width * 16 + 1;
        let e = refuse(&wide, None);
        assert!(e.contains("decodes to"), "{e}");

        let mut codebook = good.clone();
        codebook.codebook_size = 4096;
        let e = refuse(&codebook, None);
        assert!(e.contains("codebook size 4096"), "{e}");

        // Names that would reach out of the entropy folder if made into a path: a decoy
        // manifest sits where `<entropy>/unimic-entropy-x/../../decoy.json` leads.
        let entropy = dir.path().join("entropy");
        std::fs::create_dir_all(entropy.join("unimic-entropy-x")).unwrap();
        std::fs::write(dir.path().join("decoy.json"), b"{}").unwrap();
        let mut evil = good.clone();
        evil.model.name = "unimic-entropy-x/../../decoy".into();
        let e = refuse(&evil, Some(&entropy));
        assert!(e.contains("unknown entropy model"), "{e}");
        let mut evil = good.clone();
        evil.levels[0].model.name = "../../decoy".into();
        let e = refuse(&evil, Some(&entropy));
        assert!(e.contains("level 2 names the entropy model"), "{e}");
        // A well-formed generic id the folder does not hold.
        let mut absent = good.clone();
        absent.model.name = "unimic-entropy-generic-v999".into();
        let e = refuse(&absent, None);
        assert!(e.contains("which is not in"), "{e}");
        // Another kind of transformer is not a level-1 model of a file.
        let mut masked = good.clone();
        masked.model.name = unimic_codec::shipped::MASKED_ID.into();
        let e = refuse(&masked, None);
        assert!(e.contains("unknown entropy model"), "{e}");
    }
}

//! The identities docs/PROTOCOL.md §4.4 lists, generated from the code and the shipped files:
//!
//! * the tables between `<!-- generated: NAME -->` and `<!-- end generated -->` (the shipped
//!   image tokenizers, the shipped entropy model files) are rebuilt here from `models/` and must
//!   equal the document's, so a model file that changes without the table fails this test (run
//!   it with `UNIMIC_BLESS_SPEC=1` to rewrite the tables, then review the diff);
//! * the content hashes of the algorithmic entropy models are those the codec reports.
//!
//! The wire ids (`unimic-entropy/…`, `o200k_base`) are the transport's and are checked in
//! `transport/tests/spec_identities.rs`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use unimic_codec::context::SequenceKind;
use unimic_codec::entropy::generic::Generic;
use unimic_codec::entropy::ladder::Ladder;
use unimic_codec::entropy::masked::Masked;
use unimic_codec::entropy::text_cond::TextCond;
use unimic_codec::entropy::{Static, TextPrior};
use unimic_codec::part::{CodecConfig, ModelChoice, PartCodec};
use unimic_codec::shipped;
use unimic_codec::tokenizer::taef2::combined_sha256;
use unimic_codec::tokenizer::{load_dir, shipped_dirs};

fn spec_path() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The path of `p` relative to the repository root, with forward slashes.
fn repo_path(p: &Path) -> String {
    let root = shipped::source_models_dir().join("..");
    let root = root.canonicalize().unwrap();
    p.canonicalize()
        .unwrap()
        .strip_prefix(&root)
        .unwrap()
        .to_string_lossy()
        .replace('\\', "/")
}

/// The rows of the shipped image tokenizers: id (the manifest name), version, hash, codebook
/// size, pixels per token side, directory. The hash is recomputed from the files by the
/// documented rule and checked against the loaded tokenizer's.
fn tokenizer_rows() -> Vec<String> {
    let mut rows = vec![
        "| id | version | hash (SHA-256, hex) | codebook | pixels per token | directory |".into(),
        "| -- | -- | -- | -- | -- | -- |".into(),
    ];
    for dir in shipped_dirs() {
        let tok = load_dir(&dir).unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        let read =
            |rel: &serde_json::Value| std::fs::read(dir.join(rel.as_str().unwrap())).unwrap();
        // The documented rule, from the files themselves.
        let rule = match manifest["format"].as_str().unwrap() {
            "unimic-taef2-tokenizer/1" => {
                let f = &manifest["files"];
                combined_sha256(
                    &read(&f["encoder"]["path"]),
                    &read(&f["decoder"]["path"]),
                    &read(&f["quantizer"]["path"]),
                )
            }
            "unimic-vq-tokenizer/1" => sha_hex(&read(&manifest["weights"])),
            other => panic!("unknown tokenizer format {other}"),
        };
        assert_eq!(tok.id().sha256, rule, "{}", dir.display());
        rows.push(format!(
            "| `{}` | 1 | `{}` | {} | {} | `{}` |",
            tok.id().name,
            tok.id().sha256,
            tok.codebook_size(),
            tok.factor(),
            repo_path(&dir)
        ));
    }
    rows
}

/// The rows of the shipped entropy model files: every manifest and static model file of
/// `models/entropy`, with the SHA-256 of the file the handshake names.
fn model_rows() -> Vec<String> {
    let dir = shipped::source_models_dir().join("entropy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("json" | "umstatic")
            )
        })
        .collect();
    files.sort();
    let mut rows = vec![
        "| file | manifest id | kind (wire id, §4.4) | K | SHA-256 (hex) |".into(),
        "| -- | -- | -- | -- | -- |".into(),
    ];
    for path in files {
        if path.extension().and_then(|e| e.to_str()) == Some("umstatic") {
            let bytes = std::fs::read(&path).unwrap();
            let model = Static::from_bytes(&bytes).unwrap();
            assert_eq!(hex(&model.content_hash()), sha_hex(&bytes));
            rows.push(format!(
                "| `{}` | – | {} | {} | `{}` |",
                repo_path(&path),
                match ladder_level(&path) {
                    Some(l) => format!("ladder level {l} (a part of `unimic-entropy/ladder`)"),
                    None => "static grid (`unimic-entropy/static-grid`)".into(),
                },
                model.alphabet_size(),
                sha_hex(&bytes)
            ));
            continue;
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let (hash, k, kind) = match manifest["kind"].as_str().unwrap() {
            "generic" => {
                let (m, _) = Generic::load(&path).unwrap();
                let k = m.config().codebook_size;
                (
                    m.content_hash().to_owned(),
                    k,
                    "generic (`unimic-entropy/generic`)",
                )
            }
            "masked" => {
                let (m, _) = Masked::load(&path).unwrap();
                let k = m.config().codebook_size;
                (
                    m.content_hash().to_owned(),
                    k,
                    "masked (`unimic-entropy/masked`)",
                )
            }
            "text" => {
                let (m, _) = TextCond::load(&path).unwrap();
                let k = m.config().codebook_size;
                (
                    m.content_hash().to_owned(),
                    k,
                    "text-conditioned (`unimic-entropy/text`)",
                )
            }
            other => panic!("{}: unknown kind {other}", path.display()),
        };
        let id = manifest["id"].as_str().unwrap();
        let weights = manifest["weights"].as_str().unwrap();
        let weights = dir.join(weights);
        assert_eq!(hash, sha_hex(&std::fs::read(&weights).unwrap()));
        rows.push(format!(
            "| `{}` | `{id}` | {kind} | {k} | `{hash}` |",
            repo_path(&weights)
        ));
    }
    // The ladder as the handshake names it: one hash over its level files (CODING.md §3.5).
    let top = shipped::LADDER_TOP_LEVEL;
    let mut digests = Vec::new();
    for l in 2..=top {
        let f = dir.join(format!("unimic-entropy-ladder-l{l}-v1.umstatic"));
        digests.extend_from_slice(&Sha256::digest(std::fs::read(&f).unwrap()));
    }
    let rule = sha_hex(&digests);
    let ladder = Ladder::load(&dir, top, shipped::LADDER_VERSION).unwrap();
    assert_eq!(hex(&ladder.content_hash()), rule);
    rows.push(format!(
        "| `models/entropy/unimic-entropy-ladder-l{{2…{top}}}-v1.umstatic` together | – | ladder, levels 2 … {top} (`unimic-entropy/ladder`) | {} | `{rule}` |",
        ladder.alphabet_size()
    ));
    rows
}

/// The ladder level a static model file codes, from its name.
fn ladder_level(path: &Path) -> Option<usize> {
    let name = path.file_stem()?.to_str()?;
    let rest = name.strip_prefix("unimic-entropy-ladder-l")?;
    rest.split_once('-')?.0.parse().ok()
}

/// The generated block `name` of the document: its lines, and where it sits.
fn block(spec: &str, name: &str) -> (usize, usize) {
    let open = format!("<!-- generated: {name} -->\n");
    let start = spec
        .find(&open)
        .unwrap_or_else(|| panic!("PROTOCOL.md has no {open:?}"))
        + open.len();
    let end = start
        + spec[start..]
            .find("<!-- end generated -->")
            .expect("end of the generated block");
    (start, end)
}

/// Compares (or, with `UNIMIC_BLESS_SPEC=1`, rewrites) the generated block `name`.
fn check_block(name: &str, rows: Vec<String>) {
    let path = spec_path();
    let spec = std::fs::read_to_string(&path).unwrap();
    let (start, end) = block(&spec, name);
    let want = rows.join("\n") + "\n";
    if spec[start..end] == want {
        return;
    }
    if std::env::var_os("UNIMIC_BLESS_SPEC").is_some() {
        let new = format!("{}{want}{}", &spec[..start], &spec[end..]);
        std::fs::write(&path, new).unwrap();
        return;
    }
    panic!(
        "PROTOCOL.md's generated table {name} is out of date (rerun with UNIMIC_BLESS_SPEC=1 to \
         rewrite it); it should read:\n{want}"
    );
}

#[test]
fn the_shipped_tokenizer_table_is_current() {
    check_block("shipped-tokenizers", tokenizer_rows());
}

#[test]
fn the_shipped_entropy_model_table_is_current() {
    check_block("shipped-entropy-models", model_rows());
}

#[test]
fn algorithmic_model_hashes_are_the_documented_strings() {
    let spec = std::fs::read_to_string(spec_path()).unwrap();
    let prior = TextPrior::train(200_019, [&[1u32, 2, 3][..]]);
    let primed = PartCodec::new(
        CodecConfig::default().with_text_prior(std::sync::Arc::new(prior.clone()), true),
    );
    let plain = PartCodec::default();
    let prior_hex = sha_hex(&prior.to_bytes());
    for (choice, kind, codec, description) in [
        (
            ModelChoice::Uniform,
            SequenceKind::Text,
            &plain,
            "unimic-entropy/uniform/v1".to_owned(),
        ),
        (
            ModelChoice::Uniform,
            SequenceKind::Grid,
            &plain,
            "unimic-entropy/uniform/v1".to_owned(),
        ),
        (
            ModelChoice::Adaptive,
            SequenceKind::Grid,
            &plain,
            "unimic-entropy/adaptive-grid/v1".to_owned(),
        ),
        (
            ModelChoice::Adaptive,
            SequenceKind::Text,
            &plain,
            "unimic-entropy/adaptive-text/v1".to_owned(),
        ),
        (
            ModelChoice::Adaptive,
            SequenceKind::Text,
            &primed,
            format!("unimic-entropy/adaptive-text/v1;prior={prior_hex}"),
        ),
    ] {
        let id = codec.identity(choice, kind).unwrap();
        assert_eq!(id.version, 1);
        assert_eq!(
            hex(&id.hash),
            sha_hex(description.as_bytes()),
            "{description}"
        );
        if !description.contains(";prior=") {
            // The document names the string and its hash.
            let row = format!("SHA-256(`{description}`) = `{}`", hex(&id.hash));
            assert!(spec.contains(&row), "PROTOCOL.md §4.4 lacks {row}");
        }
    }
    // The file-backed models hash their files.
    let static_text = PartCodec::new(
        CodecConfig::default().with_text_prior(std::sync::Arc::new(prior.clone()), false),
    );
    let id = static_text
        .identity(ModelChoice::Static, SequenceKind::Text)
        .unwrap();
    assert_eq!(hex(&id.hash), prior_hex);
}

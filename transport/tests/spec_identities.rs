//! The wire identities of docs/PROTOCOL.md §4.4, as a real handshake puts them on the wire: the
//! `o200k_base` tokenizer and every built-in entropy model (id, version, hash, order), and the
//! uniform model's id range for text. The shipped files' hashes are checked against the files in
//! `codec/tests/spec_identities.rs`; here, that a file-backed model's wire hash is its file's.

use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use unimic_codec::entropy::generic::Generic;
use unimic_codec::entropy::ladder::Ladder;
use unimic_codec::entropy::masked::Masked;
use unimic_codec::entropy::text_cond::TextCond;
use unimic_codec::entropy::{Static, TextPrior};
use unimic_codec::part::CodecConfig;
use unimic_codec::shipped;
use unimic_transport::tls::{ClientTls, ServerTls};
use unimic_transport::{
    Client, ClientConfig, ModelChoice, OutgoingMessage, OutgoingPart, ReceivedPart, Role,
    SendError, Server, ServerConfig, SessionConfig, TokenizerInfo, TokenizerKind,
};

const SPEC: &str = include_str!("../../docs/PROTOCOL.md");

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn entropy_dir() -> PathBuf {
    shipped::source_models_dir().join("entropy")
}

/// A codec holding every built-in entropy model, and the files behind the file-backed ones
/// (wire id, file).
fn full_codec() -> (CodecConfig, Vec<(&'static str, Vec<u8>)>) {
    let dir = entropy_dir();
    let weights = |id: &str| {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(shipped::manifest_path(&dir, id)).unwrap())
                .unwrap();
        std::fs::read(dir.join(m["weights"].as_str().unwrap())).unwrap()
    };
    let (generic, _) = Generic::load(&shipped::manifest_path(&dir, shipped::GENERIC_ID)).unwrap();
    let (masked, _) = Masked::load(&shipped::manifest_path(&dir, shipped::MASKED_ID)).unwrap();
    let (text, _) = TextCond::load(&shipped::manifest_path(&dir, shipped::TEXT_ID)).unwrap();
    let ladder = std::fs::read(dir.join("unimic-entropy-ladder-l2-v1.umstatic")).unwrap();
    let prior = TextPrior::train(200_019, [&[13_225u32, 11, 2_375, 0][..]]);
    let files = vec![
        ("unimic-entropy/static-text", prior.to_bytes()),
        ("unimic-entropy/static-grid", ladder.clone()),
        ("unimic-entropy/generic", weights(shipped::GENERIC_ID)),
        ("unimic-entropy/masked", weights(shipped::MASKED_ID)),
        ("unimic-entropy/text", weights(shipped::TEXT_ID)),
    ];
    let codec = CodecConfig::default()
        .with_generic(Arc::new(generic))
        .with_masked(Arc::new(masked))
        .with_text_cond(Arc::new(text))
        .with_static_grid(Arc::new(Static::from_bytes(&ladder).unwrap()))
        .with_text_prior(Arc::new(prior), false)
        .with_ladder(Arc::new(
            Ladder::load(&dir, shipped::LADDER_TOP_LEVEL, shipped::LADDER_VERSION).unwrap(),
        ));
    (codec, files)
}

/// The rows of §4.4's entropy model table, in order: (wire id, the rest of the row).
fn entropy_rows() -> Vec<(String, String)> {
    let start = SPEC
        .find("**Entropy models.**")
        .expect("§4.4 entropy models");
    let table = &SPEC[start..];
    let table = &table[table.find("| id |").unwrap()..];
    table
        .lines()
        .take_while(|l| l.starts_with('|'))
        .filter(|l| l.starts_with("| `unimic-entropy/"))
        .map(|l| {
            let id = l[3..].split('`').next().unwrap().to_owned();
            (id, l.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_carries_the_documented_identities() {
    let (codec, files) = full_codec();
    let session = SessionConfig::default().with_codec(codec);
    let tls = ServerTls::self_signed().unwrap();
    let pin = tls.identity.cert_hash();
    let mut server = Server::bind(ServerConfig::new(tls).with_session(session.clone())).unwrap();
    let addr = server.local_addr().unwrap();
    let client =
        Client::new(ClientConfig::new(ClientTls::pinned(pin)).with_session(session)).unwrap();
    let (c, s) = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        tokio::join!(client.connect(addr, "localhost"), server.accept())
    })
    .await
    .unwrap();
    let (client, server) = (c.unwrap(), s.unwrap());
    let neg = client.negotiated();

    // Tokenizers: the default session offers o200k_base alone.
    let o200k = TokenizerInfo::o200k();
    assert_eq!(neg.tokenizers, vec![o200k.info.clone()]);
    assert_eq!(o200k.info.id, "o200k_base");
    assert_eq!(o200k.info.version.into_inner(), 1);
    assert_eq!(
        o200k.info.hash,
        <[u8; 32]>::from(Sha256::digest(b"tiktoken/o200k_base"))
    );
    let row = format!(
        "| `o200k_base` | 1 | SHA-256(`tiktoken/o200k_base`) = `{}`",
        hex(&o200k.info.hash)
    );
    assert!(SPEC.contains(&row), "PROTOCOL.md §4.4 lacks {row}");
    assert_eq!(
        o200k.kind,
        TokenizerKind::Text {
            vocab_size: 200_019
        }
    );
    assert!(SPEC.contains("`0 … 200018`: 200,019 ids"));

    // Entropy models: every row of the table, in its order, with its hash.
    let rows = entropy_rows();
    let wire: Vec<&str> = neg.entropy_models.iter().map(|m| m.id.as_str()).collect();
    let documented: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(wire, documented, "the models and their order");
    for (m, (_, row)) in neg.entropy_models.iter().zip(&rows) {
        assert_eq!(m.version.into_inner(), 1, "{}", m.id);
        assert!(row.starts_with(&format!("| `{}` | 1 |", m.id)), "{row}");
        if m.id == "unimic-entropy/ladder" {
            // SHA-256 over the level files' digests, in level order (CODING.md §3.5), as the
            // generated table lists it.
            let mut digests = Vec::new();
            for l in 2..=shipped::LADDER_TOP_LEVEL {
                let f = entropy_dir().join(format!("unimic-entropy-ladder-l{l}-v1.umstatic"));
                digests.extend_from_slice(&Sha256::digest(std::fs::read(f).unwrap()));
            }
            assert_eq!(m.hash, <[u8; 32]>::from(Sha256::digest(&digests)));
            assert!(SPEC.contains(&format!("`{}` |", hex(&m.hash))), "{}", m.id);
            continue;
        }
        match files.iter().find(|(id, _)| *id == m.id) {
            Some((_, file)) => {
                // File-backed: the SHA-256 of the file.
                assert_eq!(m.hash, <[u8; 32]>::from(Sha256::digest(file)), "{}", m.id);
            }
            None => {
                // Algorithmic: the hash of the string the row names.
                let name = row.split("SHA-256(`").nth(1).unwrap();
                let name = name.split('`').next().unwrap();
                let want = format!("SHA-256(`{name}`) = `{}`", hex(&m.hash));
                assert_eq!(m.hash, <[u8; 32]>::from(Sha256::digest(name.as_bytes())));
                assert!(row.contains(&want), "{row} lacks {want}");
            }
        }
        // A shipped file's hash is in the generated table.
        if m.id != "unimic-entropy/static-text" && files.iter().any(|(id, _)| *id == m.id) {
            assert!(SPEC.contains(&format!("`{}` |", hex(&m.hash))), "{}", m.id);
        }
    }

    // The uniform model codes text ids 0 ..= 200018.
    let top = vec![0u32, 199_997, 200_018];
    client
        .send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::text(top.clone()).with_model(ModelChoice::Uniform)),
        )
        .await
        .unwrap();
    let got = server
        .recv()
        .await
        .unwrap()
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(got.parts, vec![ReceivedPart::Text(top)]);
    let over = client
        .send(
            OutgoingMessage::new(Role::User)
                .with_part(OutgoingPart::text(vec![200_019]).with_model(ModelChoice::Uniform)),
        )
        .await;
    assert!(matches!(over, Err(SendError::Codec(_))), "{over:?}");
}

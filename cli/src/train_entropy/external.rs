//! Training outside this binary: `--export-data` writes the assembled data for an outside trainer
//! (`tools/gpu-train/train_entropy.py`, the same networks in PyTorch for an accelerator), and
//! `--import` adopts the weights it wrote, with its own record of the run (`<stem>.train.json`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
use unimic_codec::entropy::train::GridSet;
use unimic_codec::grid::{write_grid_file, TokenGrid};
use unimic_codec::nn::model::TrainingRecord;

/// Writes `dir/train.umtg` and `dir/val.umtg` (token-grid files), `dir/data.txt` (the data
/// description that goes into manifests) and, when the sets carry captions, `dir/texts.json`:
/// `{"captions": [[o200k ids]...], "train": [[caption indices]...], "val": [...]}`, one list per
/// grid, its own caption first, then its alternatives (each distinct caption stored once).
pub fn export_data<'a>(
    dir: &Path,
    train: &'a GridSet,
    val: &'a GridSet,
    data: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut captions: Vec<&'a [u32]> = Vec::new();
    let mut index: HashMap<&'a [u32], usize> = HashMap::new();
    let mut lists = |set: &'a GridSet| -> Vec<Vec<usize>> {
        set.samples
            .iter()
            .map(|s| {
                std::iter::once(&s.text)
                    .chain(&s.alt_texts)
                    .filter(|t| !t.is_empty())
                    .map(|t| {
                        *index.entry(t.as_slice()).or_insert_with(|| {
                            captions.push(t);
                            captions.len() - 1
                        })
                    })
                    .collect()
            })
            .collect()
    };
    let (tr, va) = (lists(train), lists(val));
    for (name, set) in [("train", train), ("val", val)] {
        let grids = set
            .samples
            .iter()
            .map(|s| {
                TokenGrid::new(
                    set.height as u32,
                    set.width as u32,
                    set.codebook_size as u32,
                    s.ids.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let path = dir.join(format!("{name}.umtg"));
        std::fs::write(&path, write_grid_file(&grids)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !captions.is_empty() {
        let json = serde_json::json!({ "captions": captions, "train": tr, "val": va });
        let path = dir.join("texts.json");
        std::fs::write(&path, serde_json::to_vec(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    std::fs::write(dir.join("data.txt"), data)?;
    Ok(())
}

/// What an outside trainer records about its run, in `<stem>.train.json` beside the weights: a
/// manifest's training record (its `val_bits_per_token` is checked against this binary's own
/// measurement) plus where it ran.
#[derive(Debug, Deserialize)]
pub struct OutsideRun {
    /// Data, steps, batch size, seed, losses and the command line that reproduces the run.
    #[serde(flatten)]
    pub record: TrainingRecord,
    /// Where it ran (for example `cuda: NVIDIA H200`).
    #[serde(default)]
    pub device: String,
}

/// Reads the record beside `weights` (`x.safetensors` → `x.train.json`).
pub fn read_record(weights: &Path) -> anyhow::Result<(OutsideRun, PathBuf)> {
    let path = weights.with_extension("train.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let run: OutsideRun =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if run.record.steps == 0 || !run.record.train_bits_per_token.is_finite() {
        bail!("{} records no training", path.display());
    }
    Ok((run, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use unimic_codec::entropy::train::Sample;
    use unimic_codec::grid::read_grid_file;

    fn set(texts: &[(&[u32], &[&[u32]])]) -> GridSet {
        GridSet {
            height: 2,
            width: 2,
            codebook_size: 16,
            samples: texts
                .iter()
                .enumerate()
                .map(|(i, (t, alt))| Sample {
                    ids: vec![i as u32, 1, 2, 15],
                    text: t.to_vec(),
                    alt_texts: alt.iter().map(|a| a.to_vec()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn export_writes_grids_and_deduplicated_caption_lists() {
        let dir = std::env::temp_dir().join(format!("unimic-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let train = set(&[(&[5, 6], &[&[7], &[8, 9]]), (&[7], &[&[5, 6], &[8, 9]])]);
        let val = set(&[(&[8, 9], &[]), (&[], &[])]);
        export_data(&dir, &train, &val, "described").unwrap();
        let grids = read_grid_file(&std::fs::read(dir.join("train.umtg")).unwrap(), 1 << 20);
        let grids = grids.unwrap();
        assert_eq!(grids.len(), 2);
        assert_eq!(grids[1].ids(), &[1, 1, 2, 15]);
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("texts.json")).unwrap()).unwrap();
        assert_eq!(v["captions"], serde_json::json!([[5, 6], [7], [8, 9]]));
        assert_eq!(v["train"], serde_json::json!([[0, 1, 2], [1, 0, 2]]));
        assert_eq!(v["val"], serde_json::json!([[2], []]));
        assert_eq!(
            std::fs::read_to_string(dir.join("data.txt")).unwrap(),
            "described"
        );
        // Uncaptioned sets write no texts.json.
        let plain = set(&[(&[], &[])]);
        let dir2 = dir.join("plain");
        export_data(&dir2, &plain, &plain, "x").unwrap();
        assert!(!dir2.join("texts.json").exists() && dir2.join("val.umtg").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_record_beside_the_weights_is_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("unimic-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = dir.join("m.safetensors");
        assert!(read_record(&w).is_err(), "no record");
        let rec = serde_json::json!({"data": "d", "steps": 9, "batch_size": 4, "seed": 2,
            "train_bits_per_token": 6.5, "val_bits_per_token": 7.0, "command": "c"});
        std::fs::write(dir.join("m.train.json"), rec.to_string()).unwrap();
        let (r, p) = read_record(&w).unwrap();
        assert_eq!(
            (r.record.steps, r.record.batch_size, r.record.seed),
            (9, 4, 2)
        );
        assert_eq!(p, dir.join("m.train.json"));
        assert!(r.device.is_empty());
        let zero = serde_json::json!({"data": "d", "steps": 0, "batch_size": 4, "seed": 2,
            "train_bits_per_token": 6.5, "val_bits_per_token": 7.0, "command": "c"});
        std::fs::write(dir.join("m.train.json"), zero.to_string()).unwrap();
        assert!(read_record(&w).is_err(), "zero steps");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The `.umic` file reader (`unimic_codec::umic::UmicFile::from_bytes`, docs/UMIC_FILE.md).
//!
//! Invariants: parsing arbitrary bytes never panics; a file that parses is canonical, so writing
//! it back gives exactly the input bytes (shortest varints, the version implied by its levels,
//! the checksum); and every level's chunks add up to the grid it declares.

use unimic_codec::umic::UmicFile;

/// Parses `data` as a `.umic` file and checks the invariants above.
pub fn run(data: &[u8]) {
    let Ok(file) = UmicFile::from_bytes(data) else {
        return;
    };
    assert_eq!(file.to_bytes(), data, "a parsed file is not canonical");
    let total = file.grid_height * file.grid_width;
    let sum = |c: &[(u64, Vec<u8>)]| c.iter().map(|(t, _)| t).sum::<u64>();
    assert_eq!(sum(&file.chunks), total);
    for level in &file.levels {
        assert_eq!(sum(&level.chunks), total);
    }
    assert!(file.payload_bytes() <= data.len());
}

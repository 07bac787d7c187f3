//! [`TokenGrid`]: an image as a 2-D grid of codebook indices.

use thiserror::Error;

/// Largest codebook an entropy model can address (alphabet of at most 2^16 symbols).
pub const MAX_CODEBOOK: u32 = 1 << 16;

/// An image as a `height × width` grid of codebook indices, each `< codebook_size`, row-major.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenGrid {
    height: u32,
    width: u32,
    codebook_size: u32,
    ids: Vec<u32>,
}

/// Why a [`TokenGrid`] could not be built.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum GridError {
    /// `ids.len()` is not `height * width`.
    #[error("grid {height}x{width} needs {expected} ids, got {got}")]
    WrongLength {
        /// Rows.
        height: u32,
        /// Columns.
        width: u32,
        /// `height * width`.
        expected: u64,
        /// Ids supplied.
        got: usize,
    },
    /// A dimension is zero.
    #[error("grid dimensions must be non-zero, got {height}x{width}")]
    Empty {
        /// Rows.
        height: u32,
        /// Columns.
        width: u32,
    },
    /// The codebook size is 0 or above [`MAX_CODEBOOK`].
    #[error("codebook size {0} is outside 1..={MAX_CODEBOOK}")]
    BadCodebook(u32),
    /// An id is not below the codebook size.
    #[error("id {id} at index {index} is not below the codebook size {codebook_size}")]
    IdOutOfRange {
        /// Position in row-major order.
        index: usize,
        /// The offending id.
        id: u32,
        /// The codebook size.
        codebook_size: u32,
    },
}

impl TokenGrid {
    /// Builds a grid, checking shape and that every id is below `codebook_size`.
    ///
    /// ```
    /// use unimic_codec::grid::TokenGrid;
    /// let g = TokenGrid::new(2, 3, 1024, vec![0, 1, 2, 3, 4, 1023]).unwrap();
    /// assert_eq!(g.get(1, 2), 1023);
    /// assert!(TokenGrid::new(2, 3, 1024, vec![0; 5]).is_err());
    /// ```
    pub fn new(
        height: u32,
        width: u32,
        codebook_size: u32,
        ids: Vec<u32>,
    ) -> Result<Self, GridError> {
        if height == 0 || width == 0 {
            return Err(GridError::Empty { height, width });
        }
        if codebook_size == 0 || codebook_size > MAX_CODEBOOK {
            return Err(GridError::BadCodebook(codebook_size));
        }
        let expected = u64::from(height) * u64::from(width);
        if ids.len() as u64 != expected {
            return Err(GridError::WrongLength {
                height,
                width,
                expected,
                got: ids.len(),
            });
        }
        if let Some((index, &id)) = ids.iter().enumerate().find(|(_, &id)| id >= codebook_size) {
            return Err(GridError::IdOutOfRange {
                index,
                id,
                codebook_size,
            });
        }
        Ok(Self {
            height,
            width,
            codebook_size,
            ids,
        })
    }

    /// Rows.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Columns.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Number of codebook entries; every id is below it.
    pub fn codebook_size(&self) -> u32 {
        self.codebook_size
    }

    /// The ids, row-major.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Consumes the grid, returning its ids (row-major).
    pub fn into_ids(self) -> Vec<u32> {
        self.ids
    }

    /// Number of tokens (`height * width`).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Always false: grids have at least one token. Present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The id at (`row`, `col`).
    ///
    /// # Panics
    /// If the position is outside the grid.
    pub fn get(&self, row: u32, col: u32) -> u32 {
        assert!(
            row < self.height && col < self.width,
            "position outside the grid"
        );
        self.ids[(row as usize) * (self.width as usize) + col as usize]
    }
}

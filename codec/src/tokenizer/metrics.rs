//! Image quality metrics between two RGB images of equal size: PSNR, SSIM, MS-SSIM and CIEDE2000.
//!
//! * [`psnr`]: `10 log10(255² / MSE)` with the MSE over all pixels and all three channels
//!   (the usual "RGB PSNR" of learned-compression papers). Identical images give `f64::INFINITY`.
//! * [`ssim`]: Wang et al. (2004) on luma `Y = 0.299 R + 0.587 G + 0.114 B` (floating point, 0–255),
//!   11×11 Gaussian window with σ = 1.5, `K1 = 0.01`, `K2 = 0.03`, `L = 255`, averaged over the
//!   positions where the window fits inside the image (no padding). Images smaller than 11 pixels in
//!   a dimension use the whole image as one window.
//! * [`ms_ssim`]: multi-scale SSIM (Wang, Simoncelli & Bovik 2003) on the same luma with the same
//!   window and constants. Scale 1 is the image; scale `j + 1` is scale `j` averaged over 2×2 blocks
//!   (an odd last row or column is dropped). With `cs_j` the mean contrast-structure term
//!   `(2σxy + C2) / (σx² + σy² + C2)` at scale `j` and `s_M` the mean full SSIM at the coarsest
//!   scale `M`, `MS-SSIM = s_M^{w_M} · Π_{j<M} cs_j^{w_j}` with the standard weights
//!   `w = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)` and `M = 5`, each mean taken over the valid
//!   window positions as in [`ssim`]. Negative means are clamped to 0 before the power (as
//!   `pytorch_msssim` does), so the result lies in `[0, 1]`. **Small images:** `M` is the largest
//!   number of scales, at most 5, whose coarsest scale is still at least 11 pixels on both sides
//!   (5 scales need at least 176 pixels, 4 need 88, …); with `M < 5` the first `M` weights are used,
//!   rescaled to sum to 1 (with `M = 5` they are used as published; they sum to 1.0001). An image under 11 pixels on a side gets `M = 1`, i.e. [`ssim`].
//! * [`mean_ciede2000`]: the colour difference ΔE₀₀ (Sharma, Wu & Dalal 2005, the formula of CIE
//!   Publication 142 with `kL = kC = kH = 1`) of every pixel pair, averaged. Pixels are 8-bit sRGB:
//!   the IEC 61966-2-1 transfer function to linear light, the sRGB matrix to CIE XYZ (D65), then
//!   CIELAB relative to the D65 white `(0.95047, 1, 1.08883)`, the white the matrix maps RGB
//!   `(255, 255, 255)` to, so white is `L* = 100, a* = b* = 0`. See [`srgb_to_lab`] and [`ciede2000`].

use image::RgbImage;

/// Peak signal-to-noise ratio in dB over RGB; `None` if the sizes differ or an image is empty.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> Option<f64> {
    if a.dimensions() != b.dimensions() || a.is_empty() {
        return None;
    }
    let n = a.as_raw().len() as f64;
    let se: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum();
    let mse = se / n;
    Some(if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    })
}

fn luma(img: &RgbImage) -> Vec<f64> {
    img.pixels()
        .map(|p| 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]))
        .collect()
}

/// Structural similarity on luma (see the module docs); `None` if the sizes differ or an image is
/// empty.
pub fn ssim(a: &RgbImage, b: &RgbImage) -> Option<f64> {
    if a.dimensions() != b.dimensions() || a.is_empty() {
        return None;
    }
    let (w, h) = (a.width() as usize, a.height() as usize);
    Some(ssim_stats(&luma(a), &luma(b), w, h).0)
}

/// Side of the SSIM window.
const WIN: usize = 11;

/// `(mean SSIM, mean contrast-structure term)` of two `w × h` luma planes (row-major), over the
/// valid window positions, or over one whole-image window when a side is under [`WIN`].
fn ssim_stats(x: &[f64], y: &[f64], w: usize, h: usize) -> (f64, f64) {
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    if w < WIN || h < WIN {
        let n = (w * h) as f64;
        let mx = x.iter().sum::<f64>() / n;
        let my = y.iter().sum::<f64>() / n;
        let (mut vx, mut vy, mut cxy) = (0.0, 0.0, 0.0);
        for (p, q) in x.iter().zip(y) {
            vx += (p - mx) * (p - mx);
            vy += (q - my) * (q - my);
            cxy += (p - mx) * (q - my);
        }
        let (vx, vy, cxy) = (vx / n, vy / n, cxy / n);
        let cs = (2.0 * cxy + c2) / (vx + vy + c2);
        return ((2.0 * mx * my + c1) / (mx * mx + my * my + c1) * cs, cs);
    }
    let g: Vec<f64> = {
        let r: Vec<f64> = (0..WIN)
            .map(|i| {
                let d = i as f64 - 5.0;
                (-d * d / (2.0 * 1.5 * 1.5)).exp()
            })
            .collect();
        let s: f64 = r.iter().sum();
        r.into_iter().map(|v| v / s).collect()
    };
    // Separable filtering: horizontal pass (valid), then vertical pass (valid).
    let filt = |img: &[f64]| -> Vec<f64> {
        let ow = w - WIN + 1;
        let oh = h - WIN + 1;
        let mut tmp = vec![0.0; h * ow];
        for r in 0..h {
            for c in 0..ow {
                tmp[r * ow + c] = (0..WIN).map(|k| g[k] * img[r * w + c + k]).sum();
            }
        }
        let mut out = vec![0.0; oh * ow];
        for r in 0..oh {
            for c in 0..ow {
                out[r * ow + c] = (0..WIN).map(|k| g[k] * tmp[(r + k) * ow + c]).sum();
            }
        }
        out
    };
    let xx: Vec<f64> = x.iter().map(|v| v * v).collect();
    let yy: Vec<f64> = y.iter().map(|v| v * v).collect();
    let xy: Vec<f64> = x.iter().zip(y).map(|(p, q)| p * q).collect();
    let (mx, my) = (filt(x), filt(y));
    let (sxx, syy, sxy) = (filt(&xx), filt(&yy), filt(&xy));
    let (mut total, mut total_cs) = (0.0, 0.0);
    for ((((&ux, &uy), &exx), &eyy), &exy) in mx.iter().zip(&my).zip(&sxx).zip(&syy).zip(&sxy) {
        let vx = exx - ux * ux;
        let vy = eyy - uy * uy;
        let cxy = exy - ux * uy;
        let cs = (2.0 * cxy + c2) / (vx + vy + c2);
        total_cs += cs;
        total += (2.0 * ux * uy + c1) / (ux * ux + uy * uy + c1) * cs;
    }
    let n = mx.len() as f64;
    (total / n, total_cs / n)
}

/// The standard MS-SSIM scale weights (Wang, Simoncelli & Bovik 2003), finest scale first.
pub const MS_SSIM_WEIGHTS: [f64; 5] = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333];

/// Number of MS-SSIM scales used for a `w × h` image: the most, up to 5, whose coarsest scale is at
/// least 11 pixels on both sides; at least 1 (see the module docs).
pub fn ms_ssim_scales(w: u32, h: u32) -> usize {
    let (mut w, mut h, mut m) = (w as usize, h as usize, 1);
    while m < MS_SSIM_WEIGHTS.len() && w / 2 >= WIN && h / 2 >= WIN {
        w /= 2;
        h /= 2;
        m += 1;
    }
    m
}

/// 2×2 box average of a `w × h` plane, dropping an odd last row or column.
fn halve(x: &[f64], w: usize, h: usize) -> (Vec<f64>, usize, usize) {
    let (nw, nh) = (w / 2, h / 2);
    let mut out = Vec::with_capacity(nw * nh);
    for r in 0..nh {
        for c in 0..nw {
            let i = 2 * r * w + 2 * c;
            out.push((x[i] + x[i + 1] + x[i + w] + x[i + w + 1]) / 4.0);
        }
    }
    (out, nw, nh)
}

/// Multi-scale SSIM on luma (see the module docs for the definition and for small images); `None`
/// if the sizes differ or an image is empty.
pub fn ms_ssim(a: &RgbImage, b: &RgbImage) -> Option<f64> {
    if a.dimensions() != b.dimensions() || a.is_empty() {
        return None;
    }
    let m = ms_ssim_scales(a.width(), a.height());
    let weights = &MS_SSIM_WEIGHTS[..m];
    // The standard weights sum to 1.0001; they are used as published, rescaled only when fewer
    // scales fit.
    let wsum: f64 = if m == MS_SSIM_WEIGHTS.len() {
        1.0
    } else {
        weights.iter().sum()
    };
    let (mut x, mut y) = (luma(a), luma(b));
    let (mut w, mut h) = (a.width() as usize, a.height() as usize);
    let mut out = 1.0;
    for (j, &wj) in weights.iter().enumerate() {
        let (s, cs) = ssim_stats(&x, &y, w, h);
        let v = if j + 1 == m { s } else { cs };
        out *= v.max(0.0).powf(wj / wsum);
        if j + 1 < m {
            let (nx, nw, nh) = halve(&x, w, h);
            let (ny, _, _) = halve(&y, w, h);
            (x, y, w, h) = (nx, ny, nw, nh);
        }
    }
    Some(out)
}

/// 8-bit sRGB to linear light, `[0, 1]` (IEC 61966-2-1).
fn srgb_linear(v: u8) -> f64 {
    let c = f64::from(v) / 255.0;
    if c <= 0.04045 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

/// An 8-bit sRGB colour in CIELAB `[L*, a*, b*]` (D65; see the module docs).
pub fn srgb_to_lab(rgb: [u8; 3]) -> [f64; 3] {
    let [r, g, b] = rgb.map(srgb_linear);
    let x = 0.412_456_4 * r + 0.357_576_1 * g + 0.180_437_5 * b;
    let y = 0.212_672_9 * r + 0.715_152_2 * g + 0.072_175_0 * b;
    let z = 0.019_333_9 * r + 0.119_192_0 * g + 0.950_304_1 * b;
    let f = |t: f64| {
        const D: f64 = 6.0 / 29.0;
        if t > D * D * D {
            t.cbrt()
        } else {
            t / (3.0 * D * D) + 4.0 / 29.0
        }
    };
    let (fx, fy, fz) = (f(x / 0.95047), f(y), f(z / 1.08883));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// CIEDE2000 colour difference ΔE₀₀ of two CIELAB colours, `kL = kC = kH = 1` (Sharma, Wu & Dalal
/// 2005, equations 2–22, including their conventions for hue angles of achromatic colours).
pub fn ciede2000(lab1: [f64; 3], lab2: [f64; 3]) -> f64 {
    use std::f64::consts::PI;
    let [l1, a1, b1] = lab1;
    let [l2, a2, b2] = lab2;
    let c_bar = (a1.hypot(b1) + a2.hypot(b2)) / 2.0;
    let c7 = c_bar.powi(7);
    let g = 0.5 * (1.0 - (c7 / (c7 + 25f64.powi(7))).sqrt());
    let (a1p, a2p) = ((1.0 + g) * a1, (1.0 + g) * a2);
    let (c1p, c2p) = (a1p.hypot(b1), a2p.hypot(b2));
    let hue = |b: f64, a: f64| {
        if b == 0.0 && a == 0.0 {
            0.0
        } else {
            let h = b.atan2(a).to_degrees();
            if h < 0.0 {
                h + 360.0
            } else {
                h
            }
        }
    };
    let (h1p, h2p) = (hue(b1, a1p), hue(b2, a2p));
    let dl = l2 - l1;
    let dc = c2p - c1p;
    let dh = if c1p * c2p == 0.0 {
        0.0
    } else if (h2p - h1p).abs() <= 180.0 {
        h2p - h1p
    } else if h2p - h1p > 180.0 {
        h2p - h1p - 360.0
    } else {
        h2p - h1p + 360.0
    };
    let dhh = 2.0 * (c1p * c2p).sqrt() * (dh.to_radians() / 2.0).sin();
    let l_bar = (l1 + l2) / 2.0;
    let cp_bar = (c1p + c2p) / 2.0;
    let hp_bar = if c1p * c2p == 0.0 {
        h1p + h2p
    } else if (h1p - h2p).abs() <= 180.0 {
        (h1p + h2p) / 2.0
    } else if h1p + h2p < 360.0 {
        (h1p + h2p + 360.0) / 2.0
    } else {
        (h1p + h2p - 360.0) / 2.0
    };
    let t = 1.0 - 0.17 * (hp_bar - 30.0).to_radians().cos()
        + 0.24 * (2.0 * hp_bar).to_radians().cos()
        + 0.32 * (3.0 * hp_bar + 6.0).to_radians().cos()
        - 0.20 * (4.0 * hp_bar - 63.0).to_radians().cos();
    let d_theta = 30.0 * (-((hp_bar - 275.0) / 25.0).powi(2)).exp();
    let cp7 = cp_bar.powi(7);
    let rc = 2.0 * (cp7 / (cp7 + 25f64.powi(7))).sqrt();
    let l50 = (l_bar - 50.0).powi(2);
    let sl = 1.0 + 0.015 * l50 / (20.0 + l50).sqrt();
    let sc = 1.0 + 0.045 * cp_bar;
    let sh = 1.0 + 0.015 * cp_bar * t;
    let rt = -(2.0 * d_theta * PI / 180.0).sin() * rc;
    let (ql, qc, qh) = (dl / sl, dc / sc, dhh / sh);
    (ql * ql + qc * qc + qh * qh + rt * qc * qh).sqrt()
}

/// Mean CIEDE2000 difference over all pixel pairs (see the module docs); `None` if the sizes
/// differ or an image is empty. Identical images give 0.
pub fn mean_ciede2000(a: &RgbImage, b: &RgbImage) -> Option<f64> {
    if a.dimensions() != b.dimensions() || a.is_empty() {
        return None;
    }
    let total: f64 = a
        .pixels()
        .zip(b.pixels())
        .map(|(p, q)| {
            if p == q {
                0.0
            } else {
                ciede2000(srgb_to_lab(p.0), srgb_to_lab(q.0))
            }
        })
        .sum();
    Some(total / (f64::from(a.width()) * f64::from(a.height())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noisy(w: u32, h: u32, seed: u32) -> RgbImage {
        let mut s = seed;
        RgbImage::from_fn(w, h, |x, y| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let n = (s >> 28) as u8;
            image::Rgb([(x * 7) as u8 ^ n, (y * 5) as u8, ((x + y) * 3) as u8])
        })
    }

    #[test]
    fn identical_images_are_perfect() {
        let a = noisy(40, 30, 1);
        assert_eq!(psnr(&a, &a), Some(f64::INFINITY));
        assert!((ssim(&a, &a).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn psnr_of_a_known_error() {
        let a = RgbImage::from_pixel(8, 8, image::Rgb([100, 100, 100]));
        let b = RgbImage::from_pixel(8, 8, image::Rgb([110, 100, 100]));
        // MSE = 100 / 3 per value.
        let want = 10.0 * (255.0f64 * 255.0 * 3.0 / 100.0).log10();
        assert!((psnr(&a, &b).unwrap() - want).abs() < 1e-9);
    }

    #[test]
    fn ssim_drops_with_distortion_and_rejects_mismatch() {
        let a = noisy(48, 40, 3);
        let b = noisy(48, 40, 4);
        let flat = RgbImage::from_pixel(48, 40, image::Rgb([128, 128, 128]));
        let s_ab = ssim(&a, &b).unwrap();
        let s_af = ssim(&a, &flat).unwrap();
        assert!(s_ab < 1.0 && s_af < s_ab, "{s_ab} {s_af}");
        assert_eq!(ssim(&a, &noisy(47, 40, 3)), None);
        assert_eq!(psnr(&a, &noisy(47, 40, 3)), None);
    }

    /// Sharma, Wu & Dalal (2005), Table 1: `(L1, a1, b1, L2, a2, b2, ΔE00)`, all 34 pairs.
    const SHARMA: [[f64; 7]; 34] = [
        [50.0, 2.6772, -79.7751, 50.0, 0.0, -82.7485, 2.0425],
        [50.0, 3.1571, -77.2803, 50.0, 0.0, -82.7485, 2.8615],
        [50.0, 2.8361, -74.0200, 50.0, 0.0, -82.7485, 3.4412],
        [50.0, -1.3802, -84.2814, 50.0, 0.0, -82.7485, 1.0000],
        [50.0, -1.1848, -84.8006, 50.0, 0.0, -82.7485, 1.0000],
        [50.0, -0.9009, -85.5211, 50.0, 0.0, -82.7485, 1.0000],
        [50.0, 0.0, 0.0, 50.0, -1.0, 2.0, 2.3669],
        [50.0, -1.0, 2.0, 50.0, 0.0, 0.0, 2.3669],
        [50.0, 2.4900, -0.0010, 50.0, -2.4900, 0.0009, 7.1792],
        [50.0, 2.4900, -0.0010, 50.0, -2.4900, 0.0010, 7.1792],
        [50.0, 2.4900, -0.0010, 50.0, -2.4900, 0.0011, 7.2195],
        [50.0, 2.4900, -0.0010, 50.0, -2.4900, 0.0012, 7.2195],
        [50.0, -0.0010, 2.4900, 50.0, 0.0009, -2.4900, 4.8045],
        [50.0, -0.0010, 2.4900, 50.0, 0.0010, -2.4900, 4.8045],
        [50.0, -0.0010, 2.4900, 50.0, 0.0011, -2.4900, 4.7461],
        [50.0, 2.5, 0.0, 50.0, 0.0, -2.5, 4.3065],
        [50.0, 2.5, 0.0, 73.0, 25.0, -18.0, 27.1492],
        [50.0, 2.5, 0.0, 61.0, -5.0, 29.0, 22.8977],
        [50.0, 2.5, 0.0, 56.0, -27.0, -3.0, 31.9030],
        [50.0, 2.5, 0.0, 58.0, 24.0, 15.0, 19.4535],
        [50.0, 2.5, 0.0, 50.0, 3.1736, 0.5854, 1.0000],
        [50.0, 2.5, 0.0, 50.0, 3.2972, 0.0, 1.0000],
        [50.0, 2.5, 0.0, 50.0, 1.8634, 0.5757, 1.0000],
        [50.0, 2.5, 0.0, 50.0, 3.2592, 0.3350, 1.0000],
        [
            60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644,
        ],
        [
            63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630,
        ],
        [61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731],
        [35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645],
        [
            22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373,
        ],
        [36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146],
        [90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441],
        [90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381],
        [6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377],
        [2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082],
    ];

    #[test]
    fn ciede2000_matches_sharmas_table_both_ways() {
        for (i, p) in SHARMA.iter().enumerate() {
            let (x, y) = ([p[0], p[1], p[2]], [p[3], p[4], p[5]]);
            for d in [ciede2000(x, y), ciede2000(y, x)] {
                assert!((d - p[6]).abs() < 5e-5, "pair {}: {d} vs {}", i + 1, p[6]);
            }
            assert_eq!(ciede2000(x, x), 0.0);
        }
    }

    #[test]
    fn srgb_to_lab_of_known_colours() {
        // Reference values for sRGB primaries under D65 (e.g. colormine, easyrgb).
        let cases: [([u8; 3], [f64; 3]); 5] = [
            ([255, 255, 255], [100.0, 0.0, 0.0]),
            ([0, 0, 0], [0.0, 0.0, 0.0]),
            ([255, 0, 0], [53.2408, 80.0925, 67.2032]),
            ([0, 255, 0], [87.7347, -86.1827, 83.1793]),
            ([0, 0, 255], [32.2970, 79.1875, -107.8602]),
        ];
        for (rgb, want) in cases {
            let got = srgb_to_lab(rgb);
            for k in 0..3 {
                assert!(
                    (got[k] - want[k]).abs() < 0.02,
                    "{rgb:?}: {got:?} vs {want:?}"
                );
            }
        }
    }

    #[test]
    fn mean_ciede2000_of_known_images() {
        let a = noisy(20, 10, 5);
        assert_eq!(mean_ciede2000(&a, &a), Some(0.0));
        // Half the pixels black, half white against all black: mean of 0 and ΔE(black, white).
        let black = RgbImage::from_pixel(4, 2, image::Rgb([0, 0, 0]));
        let half = RgbImage::from_fn(4, 2, |_, y| image::Rgb([255 * y as u8; 3]));
        let full = ciede2000(srgb_to_lab([0; 3]), srgb_to_lab([255; 3]));
        assert!((mean_ciede2000(&black, &half).unwrap() - full / 2.0).abs() < 1e-12);
        // Black to white is ΔL* = 100 only, and SL = 1 at L̄ = 50.
        assert!((full - 100.0).abs() < 1e-3, "{full}");
        assert!((ciede2000([0.0; 3], [100.0, 0.0, 0.0]) - 100.0).abs() < 1e-12);
        assert_eq!(mean_ciede2000(&a, &noisy(19, 10, 5)), None);
    }

    #[test]
    fn ms_ssim_scale_count_and_identity() {
        assert_eq!(ms_ssim_scales(256, 256), 5);
        assert_eq!(ms_ssim_scales(176, 768), 5);
        assert_eq!(ms_ssim_scales(175, 768), 4);
        assert_eq!(ms_ssim_scales(100, 100), 4);
        assert_eq!(ms_ssim_scales(22, 300), 2);
        assert_eq!(ms_ssim_scales(21, 300), 1);
        assert_eq!(ms_ssim_scales(4, 4), 1);
        for (w, h) in [(256, 200), (100, 60), (7, 5)] {
            let a = noisy(w, h, 9);
            assert!((ms_ssim(&a, &a).unwrap() - 1.0).abs() < 1e-12, "{w}x{h}");
        }
        assert_eq!(ms_ssim(&noisy(30, 30, 1), &noisy(31, 30, 1)), None);
    }

    #[test]
    fn ms_ssim_of_flat_images_is_the_luminance_term() {
        // Flat planes stay flat at every scale: cs = 1 and SSIM = l = (2xy + C1)/(x² + y² + C1).
        let c1 = (0.01f64 * 255.0).powi(2);
        let l = (2.0 * 100.0 * 120.0 + c1) / (100.0f64 * 100.0 + 120.0 * 120.0 + c1);
        let grey = |w, h, v| RgbImage::from_pixel(w, h, image::Rgb([v, v, v]));
        let five = ms_ssim(&grey(200, 180, 100), &grey(200, 180, 120)).unwrap();
        assert!((five - l.powf(0.1333)).abs() < 1e-9, "{five}");
        let w4: f64 = MS_SSIM_WEIGHTS[..4].iter().sum();
        let four = ms_ssim(&grey(100, 100, 100), &grey(100, 100, 120)).unwrap();
        assert!((four - l.powf(0.2363 / w4)).abs() < 1e-9, "{four}");
        let one = ms_ssim(&grey(8, 8, 100), &grey(8, 8, 120)).unwrap();
        assert!((one - ssim(&grey(8, 8, 100), &grey(8, 8, 120)).unwrap()).abs() < 1e-9);
    }

    /// A smooth deterministic 256×256 test pattern and a distorted copy, shared with the reference
    /// computation below.
    fn pattern(distorted: bool) -> RgbImage {
        RgbImage::from_fn(256, 256, |x, y| {
            let (fx, fy) = (f64::from(x), f64::from(y));
            let v = 128.0
                + 60.0 * (fx / 9.0).sin() * (fy / 13.0).cos()
                + 40.0 * ((fx + fy) / 31.0).sin();
            let d = if distorted {
                25.0 * ((fx * 7.0 + fy * 3.0) / 5.0).sin()
            } else {
                0.0
            };
            let g = (v + d).round().clamp(0.0, 255.0) as u8;
            image::Rgb([g, g, g])
        })
    }

    #[test]
    fn ms_ssim_matches_a_reference_implementation() {
        // pytorch_msssim 1.0's algorithm (valid 11×11 Gaussian σ = 1.5, relu, 2×2 average
        // pooling) in float64 on this grey pattern: tools/metrics/ms_ssim_reference.py.
        const MS_SSIM_REF: f64 = 0.832_746_443_506_588_4;
        const SSIM_REF: f64 = 0.294_753_689_562_362_53;
        let (a, b) = (pattern(false), pattern(true));
        let got = ms_ssim(&a, &b).unwrap();
        let s = ssim(&a, &b).unwrap();
        assert!((got - MS_SSIM_REF).abs() < 1e-9, "ms-ssim {got}");
        assert!((s - SSIM_REF).abs() < 1e-9, "ssim {s}");
    }

    #[test]
    fn metrics_are_monotonic_in_noise() {
        let base = noisy(64, 64, 11);
        let mut s = 12345u32;
        let mut rnd = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            f64::from(s >> 8) / f64::from(1u32 << 24) - 0.5
        };
        let mut last = (f64::INFINITY, 1.0, 1.0, 0.0);
        for amp in [4.0, 16.0, 48.0, 120.0] {
            let n = RgbImage::from_fn(64, 64, |x, y| {
                let p = base.get_pixel(x, y);
                image::Rgb(
                    p.0.map(|v| (f64::from(v) + amp * rnd()).round().clamp(0.0, 255.0) as u8),
                )
            });
            let now = (
                psnr(&base, &n).unwrap(),
                ssim(&base, &n).unwrap(),
                ms_ssim(&base, &n).unwrap(),
                mean_ciede2000(&base, &n).unwrap(),
            );
            assert!(
                now.0 < last.0 && now.1 < last.1 && now.2 < last.2 && now.3 > last.3,
                "{amp}: {now:?} after {last:?}"
            );
            last = now;
        }
    }
}

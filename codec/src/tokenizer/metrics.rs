//! Image quality metrics: PSNR and SSIM between two RGB images of equal size.
//!
//! * [`psnr`]: `10 log10(255² / MSE)` with the MSE over all pixels and all three channels
//!   (the usual "RGB PSNR" of learned-compression papers). Identical images give `f64::INFINITY`.
//! * [`ssim`]: Wang et al. (2004) on luma `Y = 0.299 R + 0.587 G + 0.114 B` (floating point, 0–255),
//!   11×11 Gaussian window with σ = 1.5, `K1 = 0.01`, `K2 = 0.03`, `L = 255`, averaged over the
//!   positions where the window fits inside the image (no padding). Images smaller than 11 pixels in
//!   a dimension use the whole image as one window.

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
    let (x, y) = (luma(a), luma(b));
    const WIN: usize = 11;
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    if w < WIN || h < WIN {
        let n = (w * h) as f64;
        let mx = x.iter().sum::<f64>() / n;
        let my = y.iter().sum::<f64>() / n;
        let (mut vx, mut vy, mut cxy) = (0.0, 0.0, 0.0);
        for (p, q) in x.iter().zip(&y) {
            vx += (p - mx) * (p - mx);
            vy += (q - my) * (q - my);
            cxy += (p - mx) * (q - my);
        }
        let (vx, vy, cxy) = (vx / n, vy / n, cxy / n);
        return Some(
            ((2.0 * mx * my + c1) * (2.0 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)),
        );
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
    let xy: Vec<f64> = x.iter().zip(&y).map(|(p, q)| p * q).collect();
    let (mx, my) = (filt(&x), filt(&y));
    let (sxx, syy, sxy) = (filt(&xx), filt(&yy), filt(&xy));
    let mut total = 0.0;
    for ((((&ux, &uy), &exx), &eyy), &exy) in mx.iter().zip(&my).zip(&sxx).zip(&syy).zip(&sxy) {
        let vx = exx - ux * ux;
        let vy = eyy - uy * uy;
        let cxy = exy - ux * uy;
        total +=
            ((2.0 * ux * uy + c1) * (2.0 * cxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
    }
    Some(total / mx.len() as f64)
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
}

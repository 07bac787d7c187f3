#!/usr/bin/env python3
"""Reference MS-SSIM and SSIM for codec/src/tokenizer/metrics.rs's test
`ms_ssim_matches_a_reference_implementation`.

Transcribes pytorch_msssim 1.0's `ms_ssim` (valid 11-tap Gaussian, sigma 1.5, K = (0.01, 0.03),
relu on the per-scale means, 2x2 average pooling, the standard 5 weights) in float64 torch and runs
it on the same grey 256x256 test pattern as the Rust test (luma of a grey pixel g computed as
0.299 g + 0.587 g + 0.114 g, as the Rust code does). Needs torch and numpy:

    python tools/metrics/ms_ssim_reference.py    # prints MS-SSIM and SSIM
"""
import torch, torch.nn.functional as F, numpy as np
torch.set_default_dtype(torch.float64)
def pattern(dist):
    y, x = np.mgrid[0:256, 0:256].astype(np.float64)
    v = 128.0 + 60.0*np.sin(x/9.0)*np.cos(y/13.0) + 40.0*np.sin((x+y)/31.0)
    d = 25.0*np.sin((x*7.0+y*3.0)/5.0) if dist else 0.0
    g = np.clip(np.floor(v+d+0.5), 0, 255)
    return 0.299*g + 0.587*g + 0.114*g
# pytorch_msssim (v1.0.0) algorithm, transcribed
def _fspecial_gauss_1d(size, sigma):
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2)); g /= g.sum()
    return g.unsqueeze(0).unsqueeze(0)
def gaussian_filter(input, win):
    C = input.shape[1]; out = input
    for i, s in enumerate(input.shape[2:]):
        # valid convolution along H (i = 0), then along W (i = 1)
        out = F.conv2d(out, weight=win.view(1, 1, -1, 1) if i == 0 else win.view(1, 1, 1, -1), groups=C)
    return out
def _ssim(X, Y, data_range, win, K=(0.01, 0.03)):
    K1, K2 = K; C1 = (K1 * data_range) ** 2; C2 = (K2 * data_range) ** 2
    mu1 = gaussian_filter(X, win); mu2 = gaussian_filter(Y, win)
    mu1_sq = mu1.pow(2); mu2_sq = mu2.pow(2); mu1_mu2 = mu1 * mu2
    sigma1_sq = gaussian_filter(X * X, win) - mu1_sq
    sigma2_sq = gaussian_filter(Y * Y, win) - mu2_sq
    sigma12 = gaussian_filter(X * Y, win) - mu1_mu2
    cs_map = (2 * sigma12 + C2) / (sigma1_sq + sigma2_sq + C2)
    ssim_map = ((2 * mu1_mu2 + C1) / (mu1_sq + mu2_sq + C1)) * cs_map
    return torch.flatten(ssim_map, 2).mean(-1), torch.flatten(cs_map, 2).mean(-1)
def ms_ssim(X, Y, data_range=255):
    win = _fspecial_gauss_1d(11, 1.5)
    weights = torch.tensor([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
    mcs = []
    for i in range(5):
        s, cs = _ssim(X, Y, data_range, win)
        if i < 4:
            mcs.append(torch.relu(cs))
            padding = [s_ % 2 for s_ in X.shape[2:]]
            X = F.avg_pool2d(X, kernel_size=2, padding=padding); Y = F.avg_pool2d(Y, kernel_size=2, padding=padding)
    s = torch.relu(s)
    v = torch.stack(mcs + [s], 0)
    return torch.prod(v ** weights.view(-1, 1, 1), 0).item()
a = torch.tensor(pattern(False))[None,None]; b = torch.tensor(pattern(True))[None,None]
win = _fspecial_gauss_1d(11, 1.5)
print(repr(ms_ssim(a, b)), repr(_ssim(a,b,255,win)[0].item()))

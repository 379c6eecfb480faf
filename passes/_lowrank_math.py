"""Numeric core of the ``lowrank`` pass: truncated and data-aware SVD, Tucker-2 (HOSVD with
HOOI/ALS refinement), CP-ALS and rank selection (energy, EVBMF). Plain numpy, no graph code.

Conventions: an FC weight is ``m`` (in × out) so that y = x·m; a conv weight is
``w`` (N out channels × C in channels × kh × kw).
"""

from __future__ import annotations

import numpy as np

# Above this many elements an SVD runs in float32: float64 would double the time on
# the 100 M-element FC layers of VGG-style heads for no visible gain in accuracy.
_FLOAT64_LIMIT = 8_000_000


def svd(m: np.ndarray):
    """Thin SVD ``m = u·diag(s)·vt`` (u: a×k, s: k, vt: k×b, k = min(a, b))."""
    dtype = np.float64 if m.size <= _FLOAT64_LIMIT else np.float32
    u, s, vt = np.linalg.svd(np.asarray(m, dtype), full_matrices=False)
    return u.astype(np.float64), s.astype(np.float64), vt.astype(np.float64)


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest r whose leading singular values keep ``energy`` of Σσ² (at least 1)."""
    power = np.asarray(s, np.float64) ** 2
    total = power.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(power) / total
    # Tolerance so that energy 1.0 selects the numerical rank, not the full size.
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(s)))


# ---- EVBMF (Nakajima et al. 2013, "Global analytic solution of fully-observed VBMF") ----

def evbmf_rank(s: np.ndarray, shape: tuple) -> int:
    """Rank that empirical variational Bayes keeps for a matrix of ``shape`` with singular
    values ``s`` (all of them): the noise variance σ² is estimated by minimising the free
    energy, and components above the analytic threshold survive. Used by Kim et al. (2015)
    to pick Tucker-2 ranks from the mode unfoldings."""
    from scipy.optimize import minimize_scalar

    s = np.sort(np.asarray(s, np.float64))[::-1]
    L, M = sorted(int(d) for d in shape)          # L ≤ M
    H = len(s)
    if H < 2 or s[0] <= 0:
        return 1
    alpha = L / M
    tauubar = 2.5129 * np.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    residual = 0.0          # all min(L, M) singular values are given: nothing truncated
    eh_ub = int(min(np.ceil(L / (1 + alpha)) - 1, H)) - 1
    eh_ub = min(max(eh_ub, 0), H - 2)
    upper = (np.sum(s ** 2) + residual) / (L * M)
    lower = max(s[eh_ub + 1] ** 2 / (M * xubar), np.mean(s[eh_ub + 1:] ** 2) / M)
    lower = max(lower, upper * 1e-12)
    if lower >= upper:
        sigma2 = upper
    else:
        def free_energy(sigma2):
            x = s ** 2 / (M * sigma2)
            z1 = x[x > xubar]
            z2 = x[x <= xubar]
            tau = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
            return (np.sum(z2 - np.log(z2 + np.finfo(float).eps)) + np.sum(z1 - tau)
                    + np.sum(np.log((tau + 1) / z1)) + alpha * np.sum(np.log(tau / alpha + 1))
                    + residual / (M * sigma2) + (L - H) * np.log(sigma2))

        sigma2 = minimize_scalar(free_energy, bounds=(lower, upper), method="bounded").x
    threshold = np.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return max(1, int(np.sum(s > threshold)))


# ---- fully connected: plain and data-aware SVD ---------------------------------------

def fc_spectrum(m: np.ndarray, x: np.ndarray | None = None, ridge: float = 1e-3):
    """Singular values and right singular vectors used to split ``m`` (in × out).

    Data-free: the SVD of m. Data-aware (``x``: calibration inputs, n × in): the SVD of
    the whitened weight Lᵀ·m where L·Lᵀ = C = xᵀx/n is the input second moment, so the
    truncation error is E‖x·(m − m̂)‖², measured where the data lives. Its right singular
    vectors are the eigenvectors of mᵀ·C·m = yᵀy/n with y = x·m (out × out), so C
    (in × in: 25088² for VGG) is never formed. ``ridge`` adds ridge·mean(eig C)·I to C so
    directions the calibration set never visits still count a little.

    Returns (s, q): s descending (k = min(in, out)), q (out × k) orthonormal; the rank-r
    split is m ≈ (m·q_r)·q_rᵀ, which undoes the whitening.
    """
    if x is None:
        if m.size <= _FLOAT64_LIMIT:
            _, s, vt = svd(m)
            return s, vt.T
        # Large FC (VGG's 25088 × 4096): the eigen-decomposition of the small Gram mᵀm
        # gives the same right singular vectors several times faster than an SVD of m
        # (one BLAS-3 product instead of a bidiagonalisation); the squared condition
        # number is harmless for a truncation decided by energy.
        m32 = np.asarray(m, np.float32)
        w, q = np.linalg.eigh((m32.T @ m32).astype(np.float64))
        order = np.argsort(w)[::-1][:min(m.shape)]
        return np.sqrt(np.clip(w[order], 0, None)), q[:, order]
    m64 = np.asarray(m, np.float64)
    x64 = np.asarray(x, np.float64)
    n, d_in = x64.shape
    y = x64 @ m64                                            # n × out
    gram = y.T @ y / max(n, 1)                               # out × out = mᵀ C m
    if ridge > 0:
        mean_eig = float(np.sum(x64 * x64)) / max(n * d_in, 1)   # tr(C) / in
        gram += ridge * mean_eig * (m64.T @ m64)
    w, q = np.linalg.eigh(gram)
    order = np.argsort(w)[::-1][:min(m.shape)]
    return np.sqrt(np.clip(w[order], 0, None)), q[:, order]


def fc_factors(m: np.ndarray, q: np.ndarray, rank: int):
    """m (in × out) ≈ a·b with a = m·q_r (in × r), b = q_rᵀ (r × out)."""
    qr = q[:, :rank]
    return np.asarray(m, np.float64) @ qr, qr.T.copy()


# ---- convolutions: unfoldings, Tucker-2, CP ---------------------------------------------

def unfold(w: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding: that axis first, the rest flattened (dim × prod(others))."""
    return np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)


def channel_spectra(w: np.ndarray):
    """Singular values of the output-channel (N × C·k·k) and input-channel (C × N·k·k)
    unfoldings; they set Tucker-2's ranks (R2 for outputs, R1 for inputs)."""
    return svd(unfold(w, 0))[1], svd(unfold(w, 1))[1]


def _leading(m: np.ndarray, r: int) -> np.ndarray:
    u, _, _ = svd(m)
    return u[:, :r]


def tucker2(w: np.ndarray, r_out: int, r_in: int, iters: int = 0):
    """Tucker-2 of w (N × C × kh × kw) on its channel modes (Kim et al. 2015).

    HOSVD start (leading left singular vectors of the unfoldings), then ``iters`` rounds
    of HOOI (alternating least squares: each factor re-fitted with the other fixed),
    which never increases the reconstruction error.
    Returns (core R2 × R1 × kh × kw, u_out N × R2, u_in C × R1); w ≈ core ×₀ u_out ×₁ u_in.
    """
    w = np.asarray(w, np.float64)
    u_out = _leading(unfold(w, 0), r_out)
    u_in = _leading(unfold(w, 1), r_in)
    for _ in range(iters):
        u_out = _leading(unfold(np.einsum("nckl,cr->nrkl", w, u_in), 0), r_out)
        u_in = _leading(unfold(np.einsum("nckl,ns->sckl", w, u_out), 1), r_in)
    core = np.einsum("nckl,ns,cr->srkl", w, u_out, u_in, optimize=True)
    return core, u_out, u_in


def tucker2_reconstruct(core, u_out, u_in) -> np.ndarray:
    return np.einsum("srkl,ns,cr->nckl", core, u_out, u_in, optimize=True)


def cp_als(w: np.ndarray, rank: int, iters: int = 50, seed: int = 0):
    """Rank-R CP of w (N × C × kh × kw) by alternating least squares (Lebedev et al. 2015).

    w[n,c,i,j] ≈ Σ_r a[n,r]·b[c,r]·kh[i,r]·kw[j,r]. Starts from the leading singular
    vectors of each unfolding (random columns where R exceeds that mode's size); each
    step solves one factor exactly with the others fixed, with a tiny ridge because CP
    factors can become collinear (CP is ill-posed in general).
    Returns (a N×R, b C×R, kh kh×R, kw kw×R) with the scale folded into ``a``.
    """
    w = np.asarray(w, np.float64)
    rng = np.random.default_rng(seed)
    factors = []
    for mode in range(4):
        u = _leading(unfold(w, mode), rank)
        if u.shape[1] < rank:
            extra = rng.standard_normal((w.shape[mode], rank - u.shape[1]))
            u = np.concatenate([u, extra / np.linalg.norm(extra, axis=0)], axis=1)
        factors.append(u)
    unfolded = [unfold(w, mode) for mode in range(4)]
    for _ in range(max(iters, 1)):
        for mode in range(4):
            others = [f for i, f in enumerate(factors) if i != mode]
            # MTTKRP: unfolding (dim × rest) · Khatri-Rao of the other factors (rest × R);
            # the rest axes keep their order, flattened with the last fastest.
            kr = np.einsum("ir,jr,kr->ijkr", *others).reshape(-1, rank)
            mttkrp = unfolded[mode] @ kr                                 # dim × R
            gram = np.ones((rank, rank))
            for f in others:
                gram *= f.T @ f                                          # R × R (Hadamard)
            gram += 1e-10 * max(np.trace(gram) / rank, 1e-30) * np.eye(rank)
            factors[mode] = np.linalg.solve(gram, mttkrp.T).T
            if mode < 3:
                # Keep b, kh, kw unit-norm; the scale lives in the next solved factor.
                norms = np.linalg.norm(factors[mode], axis=0)
                factors[mode] = factors[mode] / np.where(norms > 0, norms, 1)
    # Final pass solved kw last; move its column scale into a.
    norms = np.linalg.norm(factors[3], axis=0)
    factors[3] = factors[3] / np.where(norms > 0, norms, 1)
    factors[0] = factors[0] * norms
    return tuple(factors)


def cp_reconstruct(a, b, kh, kw) -> np.ndarray:
    return np.einsum("nr,cr,kr,lr->nckl", a, b, kh, kw, optimize=True)


def relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(np.asarray(w, np.float64) - approx)) / max(norm, 1e-30)


def ridge_fit(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3):
    """min ‖x·m + c − y‖² + λ‖m‖² with λ = ridge·mean feature power; x n×d, y n×k.

    Returns (m d×k, c k). Centring first makes the bias exact and unpenalised.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc                                                    # d × d
    lam = ridge * max(np.trace(gram) / max(len(gram), 1), 1e-30)
    m = np.linalg.solve(gram + lam * np.eye(len(gram)), xc.T @ yc)      # d × k
    return m, y_mean - x_mean @ m

//! The per-position operations of a decoder layer on plain `f32` slices, for the engine's
//! own layer loop (`Model::forward` when every weight runs on `kernels`). They compute what
//! candle's `rms_norm`, `rope`, `softmax` and `silu` compute, in the same order, without a
//! tensor allocation or dispatch per operation: at one token per step those costs are a
//! large part of a small model's time.

#[cfg(target_arch = "x86_64")]
use super::kernels::tail_mask;
use super::kernels::{Simd, axpy, dot_f32, simd_level};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// `out_i = x_i / sqrt(mean(x²) + eps) · w_i` for each row of `x` (rows of `w.len()`).
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum2: f32 = xr.iter().map(|v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        for ((o, v), a) in or.iter_mut().zip(xr).zip(w) {
            *o = v / m * a;
        }
    }
}

/// [`rms_norm_rows`] in place.
pub(crate) fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for xr in x.chunks_exact_mut(n) {
        let sum2: f32 = xr.iter().map(|v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        for (v, a) in xr.iter_mut().zip(w) {
            *v = *v / m * a;
        }
    }
}

/// Rotates one head's vector (`hd` values) by the position's `cos`/`sin` (`hd/2` each), the
/// halves convention (`x[i]` pairs with `x[i + hd/2]`).
pub(crate) fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x1 * sin[i] + x2 * cos[i];
    }
}

/// `out = silu(gate) · up` where each row of `gu` is `[gate | up]`.
pub(crate) fn silu_mul(gu: &[f32], inter: usize, out: &mut [f32]) {
    let simd = simd_level();
    let row = |gu: &[f32], o: &mut [f32]| {
        let (g, u) = gu.split_at(inter);
        #[cfg(target_arch = "x86_64")]
        if simd == Simd::Avx512 {
            // SAFETY: AVX-512F was detected; `g`, `u` and `o` hold `inter` values each.
            unsafe { silu_mul_avx512(g, u, o) };
            return;
        }
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    };
    let rows = out.len() / inter.max(1);
    // A batch's rows (an `exp` per value) are split over the matmul threads, which would
    // otherwise wait for this one; a row or two is not worth the hand-over.
    if rows < 4 {
        for (gu, o) in gu.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
            row(gu, o);
        }
        return;
    }
    let out_ptr = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
        for r in range {
            // SAFETY: each row is in exactly one chunk, inside `out`.
            let o = unsafe {
                std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(r * inter), inter)
            };
            row(&gu[r * 2 * inter..(r + 1) * 2 * inter], o);
        }
    });
}

/// One layer's attention shapes.
#[derive(Clone, Copy)]
pub(crate) struct HeadShape {
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    pub window: Option<usize>,
}

/// One sequence's part of [`attention_batch`]: its query rows `row..row+rows` (positions
/// `pos..pos+rows` of the sequence) and its keys and values (`nkv × cap × hd` each, positions
/// `0..pos+rows` filled).
pub(crate) struct AttnSeq<'a> {
    pub row: usize,
    pub rows: usize,
    pub pos: usize,
    pub k: KvSlice<'a>,
    pub v: KvSlice<'a>,
    pub cap: usize,
}

/// A sequence's cached keys or values, in the cache's precision ([`KvPrecision`]).
#[derive(Clone, Copy)]
pub(crate) enum KvSlice<'a> {
    Half(&'a [f16]),
    Full(&'a [f32]),
}

impl<'a> KvSlice<'a> {
    /// The `n` values from `at` as floats: the cache's own for 32-bit floats, widened into
    /// `buf` for half floats.
    fn row<'b>(self, at: usize, n: usize, buf: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        match self {
            KvSlice::Full(x) => &x[at..at + n],
            KvSlice::Half(x) => {
                f16::widen(&x[at..at + n], &mut buf[..n]);
                &buf[..n]
            }
        }
    }
}

/// How the plain layer loop's KV caches hold keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvPrecision {
    /// Half floats (llama.cpp's default): a decode step's attention reads every cached
    /// position, so half the bytes is about half its time, and twice the sequences fit the
    /// same memory. Logits move by about 1e-2 on SmolLM2-135M (greedy answers unchanged in the
    /// tests) — finer than the bf16 caches transformers and vLLM keep for bf16 checkpoints.
    #[default]
    Half,
    /// 32-bit floats: what the reference implementations compute in f32, to float rounding.
    Full,
}

impl KvPrecision {
    /// From a setting: `f16` ([`KvPrecision::Half`]) or `f32` ([`KvPrecision::Full`]).
    pub fn parse(s: &str) -> anyhow::Result<KvPrecision> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f16" => Ok(KvPrecision::Half),
            "f32" => Ok(KvPrecision::Full),
            other => anyhow::bail!("unknown KV-cache type {other:?} (f16 or f32)"),
        }
    }

    /// The setting's name for it.
    pub fn name(self) -> &'static str {
        match self {
            KvPrecision::Half => "f16",
            KvPrecision::Full => "f32",
        }
    }
}

/// An element type of a KV cache: read back as floats.
///
/// # Safety
/// `HALF` says the layout the kernels read: `true` only for a 2-byte IEEE half float, `false`
/// only for `f32`.
pub(crate) unsafe trait KvElem: Copy {
    /// `out[i] = src[i]` as floats.
    fn widen(src: &[Self], out: &mut [f32]);
    /// `dst[i] = src[i]` rounded to this type.
    fn narrow(src: &[f32], dst: &mut [Self]);
    /// Half floats (else 32-bit floats): how the kernels load them.
    const HALF: bool;
}

// SAFETY: `f32`, `HALF` false.
unsafe impl KvElem for f32 {
    fn widen(src: &[f32], out: &mut [f32]) {
        out.copy_from_slice(src);
    }
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    const HALF: bool = false;
}

// SAFETY: an IEEE half float, `HALF` true.
unsafe impl KvElem for f16 {
    fn widen(src: &[f16], out: &mut [f32]) {
        src.convert_to_f32_slice(out);
    }
    fn narrow(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
    const HALF: bool = true;
}

/// Causal attention of the query rows of several sequences, each over its own keys and
/// values (`q`, `out`: rows × nh·hd). Query heads `h` read key/value head `h / (nh/nkv)`.
/// Every (row, head) pair is one work item of one parallel pass, so a batch of short decode
/// steps fills the worker pool as a long prompt does.
pub(crate) fn attention_batch(q: &[f32], seqs: &[AttnSeq<'_>], h: HeadShape, out: &mut [f32]) {
    let HeadShape {
        nh,
        nkv,
        hd,
        window,
    } = h;
    let n_rep = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let simd = simd_level();
    // Row → its sequence.
    let mut row_seq = Vec::new();
    for (n, sq) in seqs.iter().enumerate() {
        row_seq.resize(sq.row + sq.rows, n);
    }
    let out_ptr = out.as_mut_ptr() as usize;
    let work = |items: std::ops::Range<usize>| {
        let mut scores = Vec::new();
        let mut row_f32 = vec![0f32; hd];
        for item in items {
            let (row, head) = (item / nh, item % nh);
            let sq = &seqs[row_seq[row]];
            let qpos = sq.pos + (row - sq.row);
            let first = window.map_or(0, |w| (qpos + 1).saturating_sub(w));
            let g = head / n_rep;
            let qv = &q[(row * nh + head) * hd..][..hd];
            let kv_range = g * sq.cap * hd..(g + 1) * sq.cap * hd;
            // SAFETY: item (row, head) alone writes these `hd` values, inside `out`.
            let o = unsafe {
                std::slice::from_raw_parts_mut(
                    (out_ptr as *mut f32).add((row * nh + head) * hd),
                    hd,
                )
            };
            #[cfg(target_arch = "x86_64")]
            if simd == Simd::Avx512 && (hd == 64 || hd == 128) {
                let span = first..qpos + 1;
                // SAFETY: AVX-512F was detected; the rows `first..=qpos` are in the cache
                // (`cap` rows) and `qv`/`o` hold `hd` values (`NV` vectors of 16).
                unsafe {
                    macro_rules! attend {
                        ($k:expr, $v:expr) => {{
                            let (k, v) = (&$k[kv_range.clone()], &$v[kv_range.clone()]);
                            if hd == 64 {
                                attend_avx512::<4, _>(qv, k, v, span, scale, &mut scores, o);
                            } else {
                                attend_avx512::<8, _>(qv, k, v, span, scale, &mut scores, o);
                            }
                        }};
                    }
                    match (sq.k, sq.v) {
                        (KvSlice::Half(k), KvSlice::Half(v)) => attend!(k, v),
                        (KvSlice::Full(k), KvSlice::Full(v)) => attend!(k, v),
                        _ => unreachable!("a cache holds keys and values in one precision"),
                    }
                }
                continue;
            }
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in first..=qpos {
                let k = sq.k.row(kv_range.start + j * hd, hd, &mut row_f32);
                let sc = dot_f32(qv, k, simd) * scale;
                max = max.max(sc);
                scores.push(sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            o.fill(0.0);
            for (j, p) in (first..=qpos).zip(&scores) {
                let v = sq.v.row(kv_range.start + j * hd, hd, &mut row_f32);
                axpy(p / sum, v, o, simd);
            }
        }
    };
    let rows = row_seq.len();
    let items = rows * nh;
    let keys: usize = seqs.iter().map(|sq| sq.rows * (sq.pos + sq.rows)).sum();
    if items < 2 || keys * nh * hd < 1 << 15 {
        work(0..items);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, work);
    }
}

/// One query row against keys and values `span` (rows of `hd = 16·NV` values): the scores, their softmax, and the weighted sum of the values into `o`, the
/// sum held in registers across the rows — what `attention_batch`'s portable loop computes
/// with a call per row (a decode step of several sequences spends a sixth of its time here).
///
/// # Safety
/// AVX-512F is available; `keys` and `values` hold the rows of `span`; `q` and `o` hold
/// `16·NV` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512<const NV: usize, T: KvElem>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    span: std::ops::Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = 16 * NV;
    debug_assert!(q.len() == hd && span.end * hd <= keys.len() && span.end * hd <= values.len());
    // SAFETY: as this function's; every load is inside a row of `span` or `q`, every store in
    // `o`.
    unsafe {
        let mut qv = [_mm512_setzero_ps(); NV];
        for (i, v) in qv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(q.as_ptr().add(16 * i));
        }
        scores.clear();
        scores.resize(span.len(), 0.0);
        let scale_v = _mm512_set1_ps(scale);
        let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
        // Sixteen keys at a time: their sixteen partial sums reduced together into one
        // vector of scores (a transposing tree of 45 shuffles and adds, where a horizontal
        // sum per key costs about as many for each).
        let mut j = span.start;
        while j + 16 <= span.end {
            let mut part = [_mm512_setzero_ps(); 16];
            for (p, part) in part.iter_mut().enumerate() {
                let k = keys.as_ptr().add((j + p) * hd);
                let mut acc = _mm512_mul_ps(qv[0], load16::<T>(k));
                for (i, v) in qv.iter().enumerate().skip(1) {
                    acc = _mm512_fmadd_ps(*v, load16::<T>(k.add(16 * i)), acc);
                }
                *part = acc;
            }
            let sc = _mm512_mul_ps(sum16(&part), scale_v);
            maxv = _mm512_max_ps(maxv, sc);
            _mm512_storeu_ps(scores.as_mut_ptr().add(j - span.start), sc);
            j += 16;
        }
        let mut max = _mm512_reduce_max_ps(maxv);
        while j < span.end {
            let k = keys.as_ptr().add(j * hd);
            let mut acc = _mm512_mul_ps(qv[0], load16::<T>(k));
            for (i, v) in qv.iter().enumerate().skip(1) {
                acc = _mm512_fmadd_ps(*v, load16::<T>(k.add(16 * i)), acc);
            }
            let sc = _mm512_reduce_add_ps(acc) * scale;
            max = max.max(sc);
            scores[j - span.start] = sc;
            j += 1;
        }
        let sum = exp_sub_sum(scores, max);
        let mut acc = [_mm512_setzero_ps(); NV];
        let inv = 1.0 / sum;
        for (j, p) in span.zip(scores.iter()) {
            let v = values.as_ptr().add(j * hd);
            let p = _mm512_set1_ps(p * inv);
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(p, load16::<T>(v.add(16 * i)), *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(o.as_mut_ptr().add(16 * i), *a);
        }
    }
}

/// Sixteen cached values from `p` as a vector of floats (half floats widened exactly).
///
/// # Safety
/// AVX-512F is available; `p` points at 16 readable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load16<T: KvElem>(p: *const T) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: as this function's.
    unsafe {
        if T::HALF {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }
}

/// `o = g / (1 + exp(−g)) · u`, sixteen values at a time (the `exp` a polynomial, not a
/// call per value).
///
/// # Safety
/// AVX-512F is available; `g`, `u` and `o` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(g: &[f32], u: &[f32], o: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = o.len();
    debug_assert!(g.len() == n && u.len() == n);
    let mut i = 0;
    // SAFETY: every access is below `n` (the tail masked).
    unsafe {
        let one = _mm512_set1_ps(1.0);
        while i < n {
            let left = (n - i).min(16);
            let mask = tail_mask(left);
            let gv = _mm512_maskz_loadu_ps(mask, g.as_ptr().add(i));
            let uv = _mm512_maskz_loadu_ps(mask, u.as_ptr().add(i));
            let e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let v = _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), uv);
            _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), mask, v);
            i += left;
        }
    }
}

/// Lane `p` of the result: the sum of the sixteen lanes of `v[p]`.
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sum16(v: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Pairs (a, b): per 128-bit lane [a0+a2, b0+b2, a1+a3, b1+b3].
    let mut l1 = [_mm512_setzero_ps(); 8];
    for (i, l) in l1.iter_mut().enumerate() {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        *l = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // Pairs of those: per 128-bit lane the four keys' sums of that lane, in order.
    let mut l2 = [_mm512_setzero_ps(); 4];
    for (i, l) in l2.iter_mut().enumerate() {
        let (a, b) = (_mm512_castps_pd(l1[2 * i]), _mm512_castps_pd(l1[2 * i + 1]));
        *l = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        );
    }
    // The 128-bit lanes: [k0-3: L0+L1, k0-3: L2+L3, k4-7: L0+L1, k4-7: L2+L3], then once
    // more across the two halves.
    let half = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        )
    };
    let (x, y) = (half(l2[0], l2[1]), half(l2[2], l2[3]));
    half(x, y)
}

/// `s ← exp(s − max)` for every score, returning their sum: sixteen at a time with a
/// polynomial (Cephes' `expf`: relative error about 1e-7 on the range softmax uses, every
/// argument ≤ 0), instead of a call to the C library's `expf` per score.
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_sub_sum(s: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = s.len();
    let mut i = 0;
    // SAFETY: every access is below `n` (the tail masked).
    unsafe {
        let m = _mm512_set1_ps(max);
        let mut sum = _mm512_setzero_ps();
        while i < n {
            let left = (n - i).min(16);
            let mask = tail_mask(left);
            let p = s.as_mut_ptr().add(i);
            let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p), m);
            let e = exp_ps(x);
            _mm512_mask_storeu_ps(p, mask, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
            i += left;
        }
        _mm512_reduce_add_ps(sum)
    }
}

/// `exp(x)` per lane (below −87.3 gives about 1.2e-38 where `expf` underflows to 0 — the
/// same to a softmax or SiLU; above 88.7, infinity).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp_ps(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // (The bound first: `max_ps` returns its second operand where either is NaN, so a NaN
    // stays NaN, as it does through `expf`.)
    let x = _mm512_max_ps(_mm512_set1_ps(-87.33654), x);
    // x = n·ln 2 + r, |r| ≤ ln 2 / 2; ln 2 in two parts so that r is exact.
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    // e^r = 1 + r + r²·p
    let e = _mm512_add_ps(
        _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, r),
        _mm512_set1_ps(1.0),
    );
    _mm512_scalef_ps(e, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    fn vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn norms_rope_and_silu_match_candle() {
        let d = &Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 64), d).unwrap();
        let w = Tensor::randn(0f32, 1.0, 64, d).unwrap();
        let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
        let mut got = vec![0f32; 3 * 64];
        rms_norm_rows(&vec(&x), &vec(&w), 1e-5, &mut got);
        close(&got, &vec(&want), 1e-6);
        let mut inplace = vec(&x);
        rms_norm_in_place(&mut inplace, &vec(&w), 1e-5);
        assert_eq!(inplace, got);

        let cos = Tensor::randn(0f32, 1.0, (3, 32), d).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (3, 32), d).unwrap();
        let want =
            candle_nn::rotary_emb::rope(&x.reshape((1, 1, 3, 64)).unwrap(), &cos, &sin).unwrap();
        let mut got = vec(&x);
        let (c, s) = (vec(&cos), vec(&sin));
        for (p, row) in got.chunks_exact_mut(64).enumerate() {
            rope(row, &c[p * 32..][..32], &s[p * 32..][..32]);
        }
        close(&got, &vec(&want), 1e-6);

        // One thread, and a batch split over the pool.
        // (37: a tail shorter than a vector; the first gates far out, where exp overflows or
        // underflows.)
        for (rows, inter) in [(3, 32), (9, 1024), (2, 37)] {
            let mut gv = vec(&Tensor::randn(0f32, 2.0, (rows, 2 * inter), d).unwrap());
            gv[..6].copy_from_slice(&[100.0, -100.0, 89.0, -89.0, 30.0, -30.0]);
            let gu = Tensor::from_vec(gv, (rows, 2 * inter), d).unwrap();
            let want = (gu.narrow(1, 0, inter).unwrap().silu().unwrap()
                * gu.narrow(1, inter, inter).unwrap())
            .unwrap();
            let mut got = vec![0f32; rows * inter];
            silu_mul(&vec(&gu), inter, &mut got);
            close(&got, &vec(&want), 1e-6);
        }
    }

    #[test]
    fn attention_matches_softmax_of_scores() {
        let d = &Device::Cpu;
        // Head sizes of the portable loop and of the AVX-512 kernel (64, 128).
        let cases = [16, 64, 128].into_iter().flat_map(|hd| {
            [(0, 5, None), (9, 1, None), (20, 7, Some(6)), (3, 300, None)]
                .map(|(pos, s, window)| (hd, pos, s, window))
        });
        let (nh, nkv, cap) = (6, 2, 40);
        for (hd, pos, s, window) in cases {
            let cap = cap.max(pos + s);
            let q = Tensor::randn(0f32, 1.0, (s, nh * hd), d).unwrap();
            // The cache holds half floats: the reference takes the same (rounded) values.
            let half = |t: Tensor| t.to_dtype(DType::F16).unwrap();
            let k = half(Tensor::randn(0f32, 1.0, (nkv, cap, hd), d).unwrap());
            let v = half(Tensor::randn(0f32, 1.0, (nkv, cap, hd), d).unwrap());
            let mut got = vec![0f32; s * nh * hd];
            let shape = HeadShape {
                nh,
                nkv,
                hd,
                window,
            };
            let (kv, vv): (Vec<f16>, Vec<f16>) = (
                k.flatten_all().unwrap().to_vec1().unwrap(),
                v.flatten_all().unwrap().to_vec1().unwrap(),
            );
            let (k, v) = (
                k.to_dtype(DType::F32).unwrap(),
                v.to_dtype(DType::F32).unwrap(),
            );
            // Both precisions of the cache, holding the same values.
            let (kf, vf) = (vec(&k), vec(&v));
            let mut got_full = vec![0f32; s * nh * hd];
            for (k, v, got) in [
                (KvSlice::Half(&kv), KvSlice::Half(&vv), &mut got),
                (KvSlice::Full(&kf), KvSlice::Full(&vf), &mut got_full),
            ] {
                let seq = AttnSeq {
                    row: 0,
                    rows: s,
                    pos,
                    k,
                    v,
                    cap,
                };
                attention_batch(&vec(&q), &[seq], shape, got);
            }
            assert_eq!(got, got_full, "the two precisions, the same values");
            // The same with candle: scores, mask, softmax, weighted sum.
            let t = pos + s;
            let qh = q.reshape((s, nh, hd)).unwrap().transpose(0, 1).unwrap(); // nh, s, hd
            let mut want = Vec::new();
            for head in 0..nh {
                let g = head / (nh / nkv);
                let kk = k.get(g).unwrap().narrow(0, 0, t).unwrap();
                let vv = v.get(g).unwrap().narrow(0, 0, t).unwrap();
                let sc = (qh.get(head).unwrap().matmul(&kk.t().unwrap()).unwrap()
                    / (hd as f64).sqrt())
                .unwrap();
                let mut m = vec![0f32; s * t];
                for i in 0..s {
                    for j in 0..t {
                        let qp = pos + i;
                        if j > qp || window.is_some_and(|w| qp - j >= w) {
                            m[i * t + j] = f32::NEG_INFINITY;
                        }
                    }
                }
                let sc = (sc + Tensor::from_vec(m, (s, t), d).unwrap()).unwrap();
                let p = candle_nn::ops::softmax_last_dim(&sc).unwrap();
                want.push(p.matmul(&vv).unwrap()); // s, hd
            }
            let want = Tensor::stack(&want, 1).unwrap(); // s, nh, hd
            close(&got, &vec(&want), 1e-5);
        }
    }
}

//! Integer kernels for the 32-value block formats (Q4_0, Q4_1, Q8_0) on processors with
//! AVX-512 VNNI: each position's activations are rounded to 16-bit integers per 32-value block
//! (one scale per block; each value split into two bytes, `q = 256·hi + lo`), and a block's
//! products are summed in integers by `vpdpbusd` (64 byte multiply-adds per instruction, two
//! per value for the two bytes, where a float FMA does 16).
//!
//! Why 16 bits: llama.cpp and candle round the activations to 8 bits, which changes a small
//! model's greedy answers (SmolLM2-135M at Q4_1 stops naming Paris as France's capital); 16 bits
//! keep the float path's answers (the tests compare greedy tokens with transformers on the
//! de-quantised weights) at about twice the float kernels' arithmetic rate.
//!
//! Why our own: decoding several sequences at once (and prefill) is bound by arithmetic, not
//! by reading the weights, and the float path (de-quantise rows, then FMAs) costs about as much
//! per sequence as one sequence's whole step; neither candle's quantised matmul (one
//! row·column dot at a time, 8-bit activations) nor a BLAS runs block-quantised weights against
//! a batch of rows. The layout is oneDNN's idea for int8 GEMM: the weights are interleaved by 16
//! rows so that one vector holds 4 consecutive bytes of 16 rows, each activation's 4 bytes are
//! broadcast, and one block of 16 rows × 32 values is 16 `vpdpbusd`, one conversion and one
//! FMA per position, with the unpacked weights reused across up to 8 positions
//! (`cargo bench --bench throughput -- --batch 8`: a step of 8 sequences 14.7 ms where the float
//! kernels take 29.2, one sequence 5.1 ms where they take 5.9, on a 2-core Zen 4).
//! The weights stream from the last-level cache or memory, so each block's are prefetched
//! [`PREFETCH`] bytes ahead (on a 2-core Xeon: one sequence 4.1 → 3.4–3.5 ms a step, 8
//! sequences 14.8 → 13.3–13.7).
//!
//! Every position is computed the same way whatever the batch (a position's quantisation and
//! its sums depend on it alone), so a sequence's logits are the same alone and batched.

use super::kernels::Format;

/// Rows per interleaved group: one 512-bit vector of 32-bit sums.
pub(crate) const GROUP: usize = 16;

/// How far ahead of the block being multiplied its weights are prefetched, in bytes.
const PREFETCH: usize = 8192;

/// Whether this processor runs these kernels (AVX-512 F/BW and VNNI; `FERROTUNE_NO_VNNI=1` or
/// `FERROTUNE_NO_AVX512=1` keeps the float kernels, for comparing).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| {
            let off = |v: &str| std::env::var_os(v).is_some_and(|v| v != "0");
            !off("FERROTUNE_NO_VNNI")
                && !off("FERROTUNE_NO_AVX512")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A matrix's blocks interleaved by [`GROUP`] rows (the last group padded with zero rows):
/// for group `g` and block `b`, `vectors()` vectors of 64 bytes, vector `t` holding bytes
/// `4t..4t+4` of the block of each of the 16 rows (Q8_0: the quants + 128, as unsigned bytes;
/// Q4: the nibble bytes as stored, so that the low nibbles of vector `t` are values `4t..4t+4`
/// and the high nibbles values `16+4t..16+4t+4`); then the 16 rows' scales `d` (and Q4_1's
/// minimums `m`) per block.
pub(crate) struct Packed {
    format: Format,
    nb: usize,
    qs: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
}

impl Packed {
    fn vectors(format: Format) -> usize {
        if format == Format::Q8_0 { 8 } else { 4 }
    }

    /// Interleave `qs`/`d`/`m` (the kernels' split layout: `quant_bytes` per block, one f32
    /// scale per block) of a `rows × cols` matrix.
    pub(crate) fn new(
        format: Format,
        rows: usize,
        cols: usize,
        qs: &[u8],
        d: &[f32],
        m: &[f32],
    ) -> Packed {
        let nb = cols / 32;
        let qb = if format == Format::Q8_0 { 32 } else { 16 };
        let v = Self::vectors(format);
        let groups = rows.div_ceil(GROUP);
        let mut pq = vec![0u8; groups * nb * v * 64];
        let mut pd = vec![0f32; groups * nb * GROUP];
        let mut pm = vec![0f32; if format == Format::Q4_1 { pd.len() } else { 0 }];
        for r in 0..rows {
            let (g, j) = (r / GROUP, r % GROUP);
            for b in 0..nb {
                let src = &qs[(r * nb + b) * qb..(r * nb + b + 1) * qb];
                let base = (g * nb + b) * v * 64;
                for t in 0..v {
                    let dst = &mut pq[base + t * 64 + j * 4..base + t * 64 + j * 4 + 4];
                    dst.copy_from_slice(&src[4 * t..4 * t + 4]);
                    if format == Format::Q8_0 {
                        for x in dst.iter_mut() {
                            *x ^= 0x80; // i8 q → u8 q + 128
                        }
                    }
                }
                pd[(g * nb + b) * GROUP + j] = d[r * nb + b];
                if format == Format::Q4_1 {
                    pm[(g * nb + b) * GROUP + j] = m[r * nb + b];
                }
            }
        }
        Packed {
            format,
            nb,
            qs: pq,
            d: pd,
            m: pm,
        }
    }

    /// Rows `rows` back in the kernels' split layout (`qs`, `d`, `m`), as [`Packed::new`]
    /// took them.
    pub(crate) fn unpack(&self, rows: std::ops::Range<usize>) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let nb = self.nb;
        let qb = if self.format == Format::Q8_0 { 32 } else { 16 };
        let v = Self::vectors(self.format);
        let n = rows.len();
        let (mut qs, mut d) = (vec![0u8; n * nb * qb], vec![0f32; n * nb]);
        let mut m = vec![
            0f32;
            if self.format == Format::Q4_1 {
                n * nb
            } else {
                0
            }
        ];
        for (i, r) in rows.enumerate() {
            let (g, j) = (r / GROUP, r % GROUP);
            for b in 0..nb {
                let base = (g * nb + b) * v * 64;
                let dst = &mut qs[(i * nb + b) * qb..(i * nb + b + 1) * qb];
                for t in 0..v {
                    dst[4 * t..4 * t + 4].copy_from_slice(
                        &self.qs[base + t * 64 + j * 4..base + t * 64 + j * 4 + 4],
                    );
                }
                if self.format == Format::Q8_0 {
                    for x in dst.iter_mut() {
                        *x ^= 0x80;
                    }
                }
                d[i * nb + b] = self.d[(g * nb + b) * GROUP + j];
                if self.format == Format::Q4_1 {
                    m[i * nb + b] = self.m[(g * nb + b) * GROUP + j];
                }
            }
        }
        (qs, d, m)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.qs.len() + 4 * (self.d.len() + self.m.len())
    }
}

/// Positions' activations quantised per 32-value block: `q` (two bytes a value), the scale `dx`
/// per block, and per block either the integer correction the weights' offset needs
/// (`−128·Σq` for Q8_0's unsigned quants, `−8·Σq` for Q4_0) or, for Q4_1, `dx·Σq` (its
/// minimum's term).
pub(crate) struct QuantX {
    nb: usize,
    /// `q = 256·hi + lo` per value, the two halves as bytes, one after the other per block
    /// (32 `hi` then 32 `lo`).
    q: Vec<i8>,
    dx: Vec<f32>,
    corr: Vec<i32>,
    dxs: Vec<f32>,
}

impl QuantX {
    pub(crate) fn new(format: Format, x: &[f32], cols: usize) -> QuantX {
        let nb = cols / 32;
        let n = x.len() / 32;
        let mut q = vec![0i8; 2 * x.len()];
        let (mut dx, mut corr, mut dxs) = (vec![0f32; n], vec![0i32; n], vec![0f32; n]);
        for (i, (blk, qb)) in x.chunks_exact(32).zip(q.chunks_exact_mut(64)).enumerate() {
            // SAFETY: the kernels run only where `available` (AVX-512 F/BW detected).
            #[cfg(target_arch = "x86_64")]
            let (d, s) = unsafe { quantize_block(blk, qb) };
            // Never made elsewhere (`available` is false).
            #[cfg(not(target_arch = "x86_64"))]
            let (d, s) = (0.0, 0);
            dx[i] = d;
            match format {
                Format::Q8_0 => corr[i] = -128 * s,
                Format::Q4_0 => corr[i] = -8 * s,
                _ => dxs[i] = d * s as f32,
            }
        }
        QuantX {
            nb,
            q,
            dx,
            corr,
            dxs,
        }
    }
}

/// One block of 32 activations to 16-bit integers `q = round(x / d)` with
/// `d = max|x| / Q_MAX` (ties to even), stored as their two bytes `hi = (q + 128) >> 8` and
/// `lo = q − 256·hi` (both fit a signed byte: |q| ≤ 32767 − 128); returns `d` and `Σq`.
///
/// # Safety
/// AVX-512 F/BW are available; `x` holds 32 values and `q` 64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == 32 && q.len() == 64);
    // SAFETY: 32 floats are read from `x` and 64 bytes written to `q`.
    unsafe {
        let a = _mm512_loadu_ps(x.as_ptr());
        let b = _mm512_loadu_ps(x.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        let d = amax / Q_MAX;
        let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, id));
        let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
        let half = _mm512_set1_epi32(128);
        let hi_a = _mm512_srai_epi32::<8>(_mm512_add_epi32(qa, half));
        let hi_b = _mm512_srai_epi32::<8>(_mm512_add_epi32(qb, half));
        let lo_a = _mm512_sub_epi32(qa, _mm512_slli_epi32::<8>(hi_a));
        let lo_b = _mm512_sub_epi32(qb, _mm512_slli_epi32::<8>(hi_b));
        let p = q.as_mut_ptr() as *mut __m128i;
        _mm_storeu_si128(p, _mm512_cvtepi32_epi8(hi_a));
        _mm_storeu_si128(p.add(1), _mm512_cvtepi32_epi8(hi_b));
        _mm_storeu_si128(p.add(2), _mm512_cvtepi32_epi8(lo_a));
        _mm_storeu_si128(p.add(3), _mm512_cvtepi32_epi8(lo_b));
        (d, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)))
    }
}

/// The largest 16-bit activation: 32767 − 128, so that both bytes of the split fit.
const Q_MAX: f32 = 32639.0;

/// Rows of groups `groups` (a range of group indices) for positions `first..first + P`,
/// written to `out(position, row)` (rows past the matrix's end are not written).
///
/// # Safety
/// The processor has AVX-512 F/BW and VNNI ([`available`]); `x` was quantised for `p`'s
/// format and width; `first + P` positions exist in `x`; `out` may be written for every
/// (position, row) of these groups within `rows`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn rows(
    p: &Packed,
    x: &QuantX,
    groups: std::ops::Range<usize>,
    rows: usize,
    m: usize,
    out: &impl Fn(usize, usize) -> *mut f32,
) {
    let mut i = 0;
    while i < m {
        let n = (m - i).min(8);
        for g in groups.clone() {
            // The position count and the format are constants of each kernel (its registers
            // are arrays of them).
            macro_rules! by_count {
                ($f:literal) => {
                    match n {
                        8 => group::<8, $f>(p, x, g, i, rows, out),
                        7 => group::<7, $f>(p, x, g, i, rows, out),
                        6 => group::<6, $f>(p, x, g, i, rows, out),
                        5 => group::<5, $f>(p, x, g, i, rows, out),
                        4 => group::<4, $f>(p, x, g, i, rows, out),
                        3 => group::<3, $f>(p, x, g, i, rows, out),
                        2 => group::<2, $f>(p, x, g, i, rows, out),
                        _ => group::<1, $f>(p, x, g, i, rows, out),
                    }
                };
            }
            // SAFETY: as this function's.
            unsafe {
                match p.format {
                    Format::Q8_0 => by_count!(0),
                    Format::Q4_0 => by_count!(1),
                    _ => by_count!(2),
                }
            }
        }
        i += n;
    }
}

/// One group of 16 rows against positions `first..first + P`. `F`: 0 Q8_0, 1 Q4_0, 2 Q4_1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn group<const P: usize, const F: u8>(
    p: &Packed,
    x: &QuantX,
    g: usize,
    first: usize,
    rows: usize,
    out: &impl Fn(usize, usize) -> *mut f32,
) {
    use std::arch::x86_64::*;
    // SAFETY: as this function's: the offsets stay inside `p` and `x` (checked in debug
    // builds), and `out` is writable for these rows.
    unsafe {
        let nb = p.nb;
        debug_assert_eq!(x.nb, nb);
        let v = if F == 0 { 8 } else { 4 };
        debug_assert!((g + 1) * nb * v * 64 <= p.qs.len());
        debug_assert!((first + P) * nb <= x.dx.len());
        let qs = p.qs.as_ptr().add(g * nb * v * 64);
        let d = p.d.as_ptr().add(g * nb * GROUP);
        let mm = if F == 2 {
            p.m.as_ptr().add(g * nb * GROUP)
        } else {
            std::ptr::null()
        };
        let xq = x.q.as_ptr().add(first * nb * 64);
        let mut acc = [_mm512_setzero_ps(); P];
        let low = _mm512_set1_epi8(0x0F);
        for b in 0..nb {
            let wb = qs.add(b * v * 64);
            // The weights stream from the last-level cache or memory: ask for the lines
            // PREFETCH bytes ahead (the hardware's prefetchers alone leave the loads waiting).
            for t in 0..v {
                _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(PREFETCH + t * 64) as *const i8);
            }
            let mut w = [_mm512_setzero_si512(); 8];
            if F == 0 {
                for (t, w) in w.iter_mut().enumerate() {
                    *w = _mm512_loadu_si512(wb.add(t * 64) as *const _);
                }
            } else {
                for t in 0..4 {
                    let raw = _mm512_loadu_si512(wb.add(t * 64) as *const _);
                    w[t] = _mm512_and_si512(raw, low);
                    w[4 + t] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
                }
            }
            let dv = _mm512_loadu_ps(d.add(b * GROUP));
            let mv = if F == 2 {
                _mm512_loadu_ps(mm.add(b * GROUP))
            } else {
                _mm512_setzero_ps()
            };
            // The positions four at a time, each `vpdpbusd` of a weight vector issued for all
            // four before the next vector: eight independent chains of sums (each position's
            // high and low bytes) instead of one position's two chains of eight dependent
            // ones. (Measured no faster on a Xeon, where the out-of-order core already
            // overlapped the positions, and no slower; the weight loads are the bound.)
            let mut i0 = 0;
            while i0 < P {
                let at = Block {
                    x,
                    xq,
                    first,
                    i0,
                    nb,
                    b,
                    dv,
                    mv,
                };
                match P - i0 {
                    1 => block::<1, F>(&at, &w, &mut acc[i0..]),
                    2 => block::<2, F>(&at, &w, &mut acc[i0..]),
                    3 => block::<3, F>(&at, &w, &mut acc[i0..]),
                    _ => block::<4, F>(&at, &w, &mut acc[i0..]),
                }
                i0 += 4;
            }
        }
        let r0 = g * GROUP;
        let n = (rows - r0).min(GROUP);
        for (i, acc) in acc.iter().enumerate() {
            let mut vals = [0f32; GROUP];
            _mm512_storeu_ps(vals.as_mut_ptr(), *acc);
            for (j, v) in vals.iter().enumerate().take(n) {
                *out(first + i, r0 + j) = *v;
            }
        }
    }
}

/// Where one block's sums go for positions `first + i0 ..`: see [`block`].
#[cfg(target_arch = "x86_64")]
struct Block<'a> {
    x: &'a QuantX,
    xq: *const i8,
    first: usize,
    i0: usize,
    nb: usize,
    b: usize,
    dv: std::arch::x86_64::__m512,
    mv: std::arch::x86_64::__m512,
}

/// Block `at.b` of one group for `N` positions from `at.first + at.i0`: the integer sums of
/// their two bytes against the 8 weight vectors `w`, scaled into `acc[..N]`.
///
/// # Safety
/// As [`group`]'s, for these positions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn block<const N: usize, const F: u8>(
    at: &Block<'_>,
    w: &[std::arch::x86_64::__m512i; 8],
    acc: &mut [std::arch::x86_64::__m512],
) {
    use std::arch::x86_64::*;
    let (x, xq, first, i0, nb, b) = (at.x, at.xq, at.first, at.i0, at.nb, at.b);
    let (dv, mv) = (at.dv, at.mv);
    // SAFETY: as this function's.
    unsafe {
        let mut hi = [_mm512_setzero_si512(); N];
        let mut lo = [_mm512_setzero_si512(); N];
        if F != 2 {
            for (i, lo) in lo.iter_mut().enumerate() {
                *lo = _mm512_set1_epi32(*x.corr.get_unchecked((first + i0 + i) * nb + b));
            }
        }
        for (t, w) in w.iter().enumerate() {
            for (i, (hi, lo)) in hi.iter_mut().zip(lo.iter_mut()).enumerate() {
                let xb = xq.add(((i0 + i) * nb + b) * 64) as *const i32;
                *hi = _mm512_dpbusd_epi32(*hi, *w, _mm512_set1_epi32(xb.add(t).read_unaligned()));
                *lo =
                    _mm512_dpbusd_epi32(*lo, *w, _mm512_set1_epi32(xb.add(8 + t).read_unaligned()));
            }
        }
        for (i, (hi, lo)) in hi.iter().zip(&lo).enumerate() {
            let blk = (first + i0 + i) * nb + b;
            let s = _mm512_add_epi32(_mm512_slli_epi32::<8>(*hi), *lo);
            let sc = _mm512_mul_ps(dv, _mm512_set1_ps(*x.dx.get_unchecked(blk)));
            let a = acc.get_unchecked_mut(i);
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, *a);
            if F == 2 {
                *a = _mm512_fmadd_ps(mv, _mm512_set1_ps(*x.dxs.get_unchecked(blk)), *a);
            }
        }
    }
}

/// What the kernels compute, written plainly: `x` (one position) quantised per block as
/// [`QuantX`] does, times the de-quantised rows `w` (`rows × cols`), summed in f64.
#[cfg(test)]
pub(crate) fn reference(w: &[f32], x: &[f32]) -> Vec<f32> {
    let cols = x.len();
    let mut xq = vec![0f64; cols];
    for (blk, o) in x.chunks_exact(32).zip(xq.chunks_exact_mut(32)) {
        let d = blk.iter().fold(0f32, |a, v| a.max(v.abs())) / Q_MAX;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (o, v) in o.iter_mut().zip(blk) {
            *o = f64::from((v * id).round_ties_even()) * f64::from(d);
        }
    }
    w.chunks_exact(cols)
        .map(|r| {
            r.iter()
                .zip(&xq)
                .map(|(a, b)| f64::from(*a) * b)
                .sum::<f64>() as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::kernels::QuantMatrix;
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn integer_kernels_compute_the_quantised_product_the_same_in_any_batch() {
        if !available() {
            eprintln!("this processor has no AVX-512 VNNI: nothing to check");
            return;
        }
        for (dtype, format) in [
            (GgmlDType::Q4_0, Format::Q4_0),
            (GgmlDType::Q4_1, Format::Q4_1),
            (GgmlDType::Q8_0, Format::Q8_0),
        ] {
            // Rows not a multiple of the group, a batch over the kernels' 8 and big enough
            // for the parallel pass; and a small serial one.
            for (rows, cols, m) in [(1000, 256, 11), (37, 96, 3), (48, 64, 1)] {
                let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let mat = QuantMatrix::from_bytes(format, &q.data().unwrap(), rows, cols).unwrap();
                let wd: Vec<f32> = q
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let mut xs: Vec<f32> = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                // A block of zeros (scale 0) quantises to zeros.
                xs[32..64].fill(0.0);
                let mut out = vec![0f32; m * rows];
                mat.matmul(&xs, &mut out, None);
                for i in 0..m {
                    let xr = &xs[i * cols..(i + 1) * cols];
                    let want = reference(&wd, xr);
                    for (r, want) in want.iter().enumerate() {
                        let got = out[i * rows + r];
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{format:?} {rows}×{cols} position {i} row {r}: {got} vs {want}"
                        );
                    }
                    // Alone: exactly what the batch gave this position.
                    let mut alone = vec![0f32; rows];
                    mat.matmul(xr, &mut alone, None);
                    assert_eq!(alone, out[i * rows..(i + 1) * rows], "{format:?} {i}");
                }
            }
        }
    }
}

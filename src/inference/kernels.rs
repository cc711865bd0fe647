//! Matrix products of GGUF-quantised weights (Q4_0, Q4_1, Q8_0) with **float32
//! activations**, for the CPU: AVX-512 or AVX2 + FMA when the processor has them (detected at
//! run time), a portable loop otherwise.
//!
//! candle (like llama.cpp) quantises the activations to 8 bits before each quantised matmul.
//! On a model as small as SmolLM2-135M that second rounding is visible: greedy answers drift
//! from what the same weights give in float (the capital of France stops being Paris). Here
//! the weights are expanded block by block in registers and multiplied with the activations
//! as they are, so the GGUF path computes what its de-quantised form computes (to float
//! rounding), while reading only the quantised bytes per token.

use half::f16;

/// The block formats these kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `x = d·(q − 8)`, `q` in 0..16: 18 bytes per 32 values.
    Q4_0,
    /// `x = d·q + m`, `q` in 0..16: 20 bytes per 32 values.
    Q4_1,
    /// `x = d·q`, `q` in −128..128: 34 bytes per 32 values.
    Q8_0,
}

impl Format {
    fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }
}

/// A quantised weight matrix, `rows × cols`, row-major, split at load into the block
/// quants (`qs`: 16 or 32 bytes per 32 values) and float32 scales (`d`) and offsets (`m`:
/// Q4_1's minimum, Q4_0's `−8·d`), so the inner loop converts no half floats.
pub(crate) struct QuantMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    qs: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
}

impl QuantMatrix {
    /// From the raw GGUF bytes of a tensor.
    pub fn from_bytes(
        format: Format,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> anyhow::Result<QuantMatrix> {
        if !cols.is_multiple_of(32) {
            anyhow::bail!("{format:?} rows of {cols} values are not whole blocks");
        }
        let bb = format.block_bytes();
        let n = rows * cols / 32;
        if bytes.len() != n * bb {
            anyhow::bail!("{} bytes for {rows}×{cols} {format:?} values", bytes.len());
        }
        let mut mat = QuantMatrix {
            format,
            rows,
            cols,
            qs: Vec::with_capacity(n * format.quant_bytes()),
            d: Vec::with_capacity(n),
            m: Vec::with_capacity(if format == Format::Q8_0 { 0 } else { n }),
        };
        for blk in bytes.chunks_exact(bb) {
            let d = f16_at(blk, 0);
            mat.d.push(d);
            match format {
                Format::Q8_0 => mat.qs.extend_from_slice(&blk[2..34]),
                Format::Q4_0 => {
                    mat.m.push(-8.0 * d);
                    mat.qs.extend_from_slice(&blk[2..18]);
                }
                Format::Q4_1 => {
                    mat.m.push(f16_at(blk, 2));
                    mat.qs.extend_from_slice(&blk[4..20]);
                }
            }
        }
        Ok(mat)
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes held (quants and float scales).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 4 * (self.d.len() + self.m.len())
    }

    fn row(&self, r: usize) -> Row<'_> {
        let nb = self.cols / 32;
        let qb = self.format.quant_bytes();
        Row {
            format: self.format,
            qs: &self.qs[r * nb * qb..(r + 1) * nb * qb],
            d: &self.d[r * nb..(r + 1) * nb],
            m: if self.m.is_empty() {
                &[]
            } else {
                &self.m[r * nb..(r + 1) * nb]
            },
        }
    }

    /// `out (m × rows) = x (m × cols) · Wᵀ`, plus `x · Aᵀ · B` when `low_rank` gives
    /// `(A: R × cols, B: R × rows)` — a LoRA term, added inside the same parallel pass.
    pub fn matmul(&self, x: &[f32], out: &mut [f32], low_rank: Option<(&[f32], &[f32])>) {
        let k = self.cols;
        let m = x.len() / k;
        debug_assert_eq!(x.len(), m * k);
        debug_assert_eq!(out.len(), m * self.rows);
        // Per block of 32 activations: their sum (for the offsets of Q4_0 and Q4_1).
        let sums: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
        let simd = simd_level();
        // The low-rank term first, for every row at once (m × rows): x·Aᵀ is m × R dot
        // products, then each of the R columns of B is added in, scaled, over whole rows of the
        // output, which vectorises (per-row dots of length R would not).
        let low = match low_rank {
            Some((a, b)) if !a.is_empty() => {
                let rows = self.rows;
                debug_assert_eq!(b.len(), a.len() / k * rows);
                let mut low = vec![0f32; m * rows];
                for (xr, lr) in x.chunks_exact(k).zip(low.chunks_exact_mut(rows)) {
                    for (ar, br) in a.chunks_exact(k).zip(b.chunks_exact(rows)) {
                        let s = dot_f32(ar, xr, simd);
                        if s != 0.0 {
                            axpy(s, br, lr, simd);
                        }
                    }
                }
                low
            }
            _ => Vec::new(),
        };
        let low_rank_at = |i: usize, r: usize| -> f32 {
            if low.is_empty() {
                0.0
            } else {
                low[i * self.rows + r]
            }
        };
        let rows = self.rows;
        let out_ptr = out.as_mut_ptr() as usize;
        let nb = k / 32;
        let work = |range: std::ops::Range<usize>| {
            let mut dense = Vec::new();
            for r in range {
                let w = self.row(r);
                let write = |i: usize, v: f32| {
                    // SAFETY: each (i, r) is written by exactly one work item, inside `out`.
                    unsafe { *(out_ptr as *mut f32).add(i * rows + r) = v };
                };
                if m == 1 {
                    write(0, w.dot(x, &sums[..nb], simd) + low_rank_at(0, r));
                } else {
                    // Several positions: expand the row once, then plain float dots.
                    dense.resize(k, 0.0);
                    w.dequantize(&mut dense);
                    for (i, xr) in x.chunks_exact(k).enumerate() {
                        write(i, dot_f32(&dense, xr, simd) + low_rank_at(i, r));
                    }
                }
            }
        };
        if rows * m * k < 1 << 16 {
            work(0..rows);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(rows, work);
        }
    }
}

impl Format {
    fn quant_bytes(self) -> usize {
        match self {
            Format::Q4_0 | Format::Q4_1 => 16,
            Format::Q8_0 => 32,
        }
    }
}

/// One row of a [`QuantMatrix`].
struct Row<'a> {
    format: Format,
    qs: &'a [u8],
    d: &'a [f32],
    m: &'a [f32],
}

impl Row<'_> {
    /// The row's values as floats (exactly what de-quantising the tensor gives).
    fn dequantize(&self, out: &mut [f32]) {
        let qb = self.format.quant_bytes();
        for (b, (qs, o)) in self
            .qs
            .chunks_exact(qb)
            .zip(out.chunks_exact_mut(32))
            .enumerate()
        {
            let d = self.d[b];
            match self.format {
                Format::Q8_0 => {
                    for (v, q) in o.iter_mut().zip(qs) {
                        *v = d * f32::from(*q as i8);
                    }
                }
                Format::Q4_0 | Format::Q4_1 => {
                    let m = self.m[b];
                    for j in 0..16 {
                        o[j] = d * f32::from(qs[j] & 0x0F) + m;
                        o[j + 16] = d * f32::from(qs[j] >> 4) + m;
                    }
                }
            }
        }
    }

    /// `Σ w·x` for one activation row `x` with its block sums.
    fn dot(&self, x: &[f32], sums: &[f32], simd: Simd) -> f32 {
        #[cfg(target_arch = "x86_64")]
        match simd {
            // SAFETY: AVX-512F (and AVX2 + FMA) were detected at run time; lengths match
            // (checked at load).
            Simd::Avx512 => {
                return unsafe {
                    match self.format {
                        Format::Q8_0 => dot_q8_0_avx512(self.qs, self.d, x),
                        Format::Q4_0 | Format::Q4_1 => {
                            dot_q4_avx512(self.qs, self.d, x) + dot_f32_avx2(self.m, sums)
                        }
                    }
                };
            }
            // SAFETY: AVX2 and FMA were detected at run time; lengths match (checked at load).
            Simd::Avx2 => {
                return unsafe {
                    match self.format {
                        Format::Q8_0 => dot_q8_0_avx2(self.qs, self.d, x),
                        Format::Q4_0 | Format::Q4_1 => {
                            dot_q4_avx2(self.qs, self.d, x) + dot_f32_avx2(self.m, sums)
                        }
                    }
                };
            }
            Simd::None => {}
        }
        let _ = simd;
        self.dot_scalar(x, sums)
    }

    fn dot_scalar(&self, x: &[f32], sums: &[f32]) -> f32 {
        let qb = self.format.quant_bytes();
        let mut acc = 0f32;
        for (b, (qs, xs)) in self.qs.chunks_exact(qb).zip(x.chunks_exact(32)).enumerate() {
            let mut p = 0f32;
            match self.format {
                Format::Q8_0 => {
                    for (q, v) in qs.iter().zip(xs) {
                        p += f32::from(*q as i8) * v;
                    }
                }
                Format::Q4_0 | Format::Q4_1 => {
                    for j in 0..16 {
                        p += f32::from(qs[j] & 0x0F) * xs[j] + f32::from(qs[j] >> 4) * xs[j + 16];
                    }
                    acc += self.m[b] * sums[b];
                }
            }
            acc += self.d[b] * p;
        }
        acc
    }
}

/// The widest vector instructions the kernels may use on this processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Simd {
    None,
    /// AVX2 + FMA: 8 floats per instruction.
    Avx2,
    /// AVX-512F (with AVX2 + FMA): 16 floats per instruction.
    Avx512,
}

pub(crate) fn simd_level() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<Simd> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            // FERROTUNE_NO_AVX512=1 keeps the AVX2 kernels (for comparing the two).
            let no512 = std::env::var_os("FERROTUNE_NO_AVX512").is_some_and(|v| v != "0");
            match (avx2, avx2 && !no512 && is_x86_feature_detected!("avx512f")) {
                (_, true) => Simd::Avx512,
                (true, false) => Simd::Avx2,
                _ => Simd::None,
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Simd::None
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

pub(crate) fn dot_f32(a: &[f32], b: &[f32], simd: Simd) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 {
        // SAFETY: AVX-512F was detected at run time.
        return unsafe { dot_f32_avx512(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if simd != Simd::None {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { dot_f32_avx2(a, b) };
    }
    let _ = simd;
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(_mm256_castps256_ps128(v), hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY: every load reads 8 floats below `n`.
    unsafe {
        while i + 16 <= n {
            a0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                a0,
            );
            a1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                a1,
            );
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(a0, a1));
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }
}

/// `Σ_b d_b · Σ_j q_bj · x_bj` for Q8_0 quants (32 bytes per block).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q8_0_avx2(qs: &[u8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    for (b, (q, xs)) in qs.chunks_exact(32).zip(x.chunks_exact(32)).enumerate() {
        // SAFETY: 32 bytes of quants and 32 floats are readable; unaligned loads.
        unsafe {
            let dv = _mm256_set1_ps(*d.get_unchecked(b));
            let qp = q.as_ptr() as *const __m128i;
            let xp = xs.as_ptr();
            let lo = _mm_loadu_si128(qp);
            let hi = _mm_loadu_si128(qp.add(1));
            let p0 = _mm256_fmadd_ps(
                f(_mm_srli_si128(lo, 8)),
                _mm256_loadu_ps(xp.add(8)),
                _mm256_mul_ps(f(lo), _mm256_loadu_ps(xp)),
            );
            let p1 = _mm256_fmadd_ps(
                f(_mm_srli_si128(hi, 8)),
                _mm256_loadu_ps(xp.add(24)),
                _mm256_mul_ps(f(hi), _mm256_loadu_ps(xp.add(16))),
            );
            acc0 = _mm256_fmadd_ps(dv, p0, acc0);
            acc1 = _mm256_fmadd_ps(dv, p1, acc1);
        }
    }
    // SAFETY: AVX2 is enabled in this function.
    unsafe { hsum(_mm256_add_ps(acc0, acc1)) }
}

/// `Σ_b d_b · Σ_j q_bj · x_bj` for 4-bit quants (16 bytes per block: value `j` in the low
/// nibble of byte `j`, value `j + 16` in its high nibble); the offsets are added apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q4_avx2(qs: &[u8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mask = _mm_set1_epi8(0x0F);
    let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    for (b, (q, xs)) in qs.chunks_exact(16).zip(x.chunks_exact(32)).enumerate() {
        // SAFETY: 16 bytes of quants and 32 floats are readable; unaligned loads.
        unsafe {
            let dv = _mm256_set1_ps(*d.get_unchecked(b));
            let packed = _mm_loadu_si128(q.as_ptr() as *const __m128i);
            let lo = _mm_and_si128(packed, mask); // values 0..16
            let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask); // values 16..32
            let xp = xs.as_ptr();
            let p0 = _mm256_fmadd_ps(
                f(_mm_srli_si128(lo, 8)),
                _mm256_loadu_ps(xp.add(8)),
                _mm256_mul_ps(f(lo), _mm256_loadu_ps(xp)),
            );
            let p1 = _mm256_fmadd_ps(
                f(_mm_srli_si128(hi, 8)),
                _mm256_loadu_ps(xp.add(24)),
                _mm256_mul_ps(f(hi), _mm256_loadu_ps(xp.add(16))),
            );
            acc0 = _mm256_fmadd_ps(dv, p0, acc0);
            acc1 = _mm256_fmadd_ps(dv, p1, acc1);
        }
    }
    // SAFETY: AVX2 is enabled in this function.
    unsafe { hsum(_mm256_add_ps(acc0, acc1)) }
}

/// `y += s·x`.
fn axpy(s: f32, x: &[f32], y: &mut [f32], simd: Simd) {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 {
        // SAFETY: AVX-512F was detected at run time.
        return unsafe { axpy_avx512(s, x, y) };
    }
    let _ = simd;
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += s * xv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_avx512(s: f32, x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let sv = _mm512_set1_ps(s);
    let mut i = 0;
    // SAFETY: every load and store touches 16 floats below `n`.
    unsafe {
        while i + 16 <= n {
            let yp = y.as_mut_ptr().add(i);
            _mm512_storeu_ps(
                yp,
                _mm512_fmadd_ps(sv, _mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(yp)),
            );
            i += 16;
        }
    }
    for (yv, xv) in y[i..n].iter_mut().zip(&x[i..n]) {
        *yv += s * xv;
    }
}

/// [`dot_f32_avx2`] with 16 floats per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    // SAFETY: every load reads 16 floats below `n`.
    unsafe {
        while i + 32 <= n {
            a0 = _mm512_fmadd_ps(
                _mm512_loadu_ps(a.as_ptr().add(i)),
                _mm512_loadu_ps(b.as_ptr().add(i)),
                a0,
            );
            a1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(a.as_ptr().add(i + 16)),
                _mm512_loadu_ps(b.as_ptr().add(i + 16)),
                a1,
            );
            i += 32;
        }
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }
}

/// [`dot_q4_avx2`] with 16 floats per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_q4_avx512(qs: &[u8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mask = _mm_set1_epi8(0x0F);
    let f = |v: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
    // (d, Σ_j q_j·x_j) of one block.
    let block = |b: usize, q: &[u8], xs: &[f32]| {
        // SAFETY: 16 bytes of quants and 32 floats are readable; unaligned loads.
        unsafe {
            let packed = _mm_loadu_si128(q.as_ptr() as *const __m128i);
            let lo = _mm_and_si128(packed, mask); // values 0..16
            let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask); // values 16..32
            let xp = xs.as_ptr();
            let p = _mm512_fmadd_ps(
                f(hi),
                _mm512_loadu_ps(xp.add(16)),
                _mm512_mul_ps(f(lo), _mm512_loadu_ps(xp)),
            );
            (_mm512_set1_ps(*d.get_unchecked(b)), p)
        }
    };
    let mut blocks = qs.chunks_exact(16).zip(x.chunks_exact(32)).enumerate();
    // Two blocks a turn, into two accumulators, so the FMAs do not wait on each other.
    while let Some((b, (q, xs))) = blocks.next() {
        let (dv, p) = block(b, q, xs);
        acc0 = _mm512_fmadd_ps(dv, p, acc0);
        let Some((b, (q, xs))) = blocks.next() else {
            break;
        };
        let (dv, p) = block(b, q, xs);
        acc1 = _mm512_fmadd_ps(dv, p, acc1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

/// [`dot_q8_0_avx2`] with 16 floats per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_q8_0_avx512(qs: &[u8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let f = |v: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
    for (b, (q, xs)) in qs.chunks_exact(32).zip(x.chunks_exact(32)).enumerate() {
        // SAFETY: 32 bytes of quants and 32 floats are readable; unaligned loads.
        unsafe {
            let dv = _mm512_set1_ps(*d.get_unchecked(b));
            let qp = q.as_ptr() as *const __m128i;
            let xp = xs.as_ptr();
            acc0 = _mm512_fmadd_ps(
                dv,
                _mm512_mul_ps(f(_mm_loadu_si128(qp)), _mm512_loadu_ps(xp)),
                acc0,
            );
            acc1 = _mm512_fmadd_ps(
                dv,
                _mm512_mul_ps(f(_mm_loadu_si128(qp.add(1))), _mm512_loadu_ps(xp.add(16))),
                acc1,
            );
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// The vector levels this processor can run.
    fn levels() -> Vec<Simd> {
        match simd_level() {
            Simd::Avx512 => vec![Simd::None, Simd::Avx2, Simd::Avx512],
            Simd::Avx2 => vec![Simd::None, Simd::Avx2],
            Simd::None => vec![Simd::None],
        }
    }

    #[test]
    fn the_low_rank_term_is_added_in_the_same_pass() {
        let (rows, cols, ranks) = (21, 64, 3);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let mat = QuantMatrix::from_bytes(Format::Q4_1, &q.data().unwrap(), rows, cols).unwrap();
        let wd = q.dequantize(&Device::Cpu).unwrap();
        let a = Tensor::randn(0f32, 1.0, (ranks, cols), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, (ranks, rows), &Device::Cpu).unwrap();
        for m in [1, 2] {
            let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap();
            let want = (x.matmul(&wd.t().unwrap()).unwrap()
                + x.matmul(&a.t().unwrap()).unwrap().matmul(&b).unwrap())
            .unwrap();
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let av: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let bv: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
            let mut out = vec![0f32; m * rows];
            mat.matmul(&xs, &mut out, Some((&av, &bv)));
            for (g, w) in out.iter().zip(&want) {
                assert!((g - w).abs() < 1e-3 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn every_path_computes_the_dequantised_product() {
        for (dtype, format) in [
            (GgmlDType::Q4_0, Format::Q4_0),
            (GgmlDType::Q4_1, Format::Q4_1),
            (GgmlDType::Q8_0, Format::Q8_0),
        ] {
            for m in [1, 3] {
                let (rows, cols) = (37, 96);
                let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let mat = QuantMatrix::from_bytes(format, &q.data().unwrap(), rows, cols).unwrap();
                let wd = q.dequantize(&Device::Cpu).unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap();
                let exact: Vec<Vec<f32>> = x.matmul(&wd.t().unwrap()).unwrap().to_vec2().unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let mut out = vec![0f32; m * rows];
                mat.matmul(&xs, &mut out, None);
                let sums: Vec<f32> = xs.chunks_exact(32).map(|c| c.iter().sum()).collect();
                let wrows: Vec<Vec<f32>> = wd.to_vec2().unwrap();
                for i in 0..m {
                    for r in 0..rows {
                        let want = exact[i][r];
                        let tol = 1e-4 * (1.0 + want.abs());
                        let got = out[i * rows + r];
                        assert!(
                            (got - want).abs() < tol,
                            "{format:?} {i},{r}: {got} vs {want}"
                        );
                        // The portable paths, and every vector level this processor has,
                        // agree too.
                        let xr = &xs[i * cols..(i + 1) * cols];
                        let row_sums = &sums[i * 3..(i + 1) * 3];
                        for level in levels() {
                            let v = mat.row(r).dot(xr, row_sums, level);
                            assert!((v - want).abs() < tol, "{format:?} {level:?} {v} vs {want}");
                        }
                        let s = mat.row(r).dot_scalar(xr, &sums[i * 3..(i + 1) * 3]);
                        assert!((s - want).abs() < tol, "{format:?} scalar {s} vs {want}");
                        let mut dense = vec![0f32; cols];
                        mat.row(r).dequantize(&mut dense);
                        assert_eq!(dense, wrows[r], "{format:?} row {r} de-quantised");
                        for level in levels() {
                            let v = dot_f32(&dense, xr, level);
                            assert!((v - want).abs() < tol, "dense {level:?} {v} vs {want}");
                        }
                    }
                }
            }
        }
    }
}

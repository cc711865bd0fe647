//! A Q4_1 matrix multiplication for the CPU, with AVX2 (runtime-detected) and a portable
//! fallback: the kernel llama.cpp uses (`ggml_vec_dot_q4_1_q8_1`), which candle 0.11 lacks
//! (its Q4_1 path is a scalar loop). Activations are quantised per 32 values to 8 bits with
//! their sum (Q8_1), as llama.cpp does, so the numerics are llama.cpp's.
//!
//! Q4_1 keeps the GGUF's own 4-bit weights (20 bytes per 32 values): decode on a CPU is bound
//! by the bytes of weights read per token, and re-quantising to Q8_0 (34 bytes per 32) would
//! read 1.7 times as much.

use half::f16;

/// ggml's `block_q4_1`: `x = d·q + m` for 32 values, `q` in 0..16, two per byte (value `j` in
/// the low nibble of byte `j`, value `j + 16` in its high nibble).
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ4_1 {
    d: f16,
    m: f16,
    qs: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

/// 32 activations as `d·q` (`q` in -127..=127), with `s = d·Σq`.
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ8_1 {
    d: f32,
    s: f32,
    qs: [i8; 32],
}

/// A Q4_1 weight matrix, `rows × cols`, row-major (each row is `cols / 32` blocks).
pub(crate) struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ4_1>,
}

impl Q4_1Matrix {
    /// From the raw GGUF bytes of a Q4_1 tensor.
    pub fn from_bytes(bytes: &[u8], rows: usize, cols: usize) -> anyhow::Result<Q4_1Matrix> {
        if cols % 32 != 0 {
            anyhow::bail!("Q4_1 rows of {cols} values are not whole blocks");
        }
        let n = rows * cols / 32;
        if bytes.len() != n * 20 {
            anyhow::bail!("{} bytes for {rows}×{cols} Q4_1 values", bytes.len());
        }
        let blocks = bytes
            .chunks_exact(20)
            .map(|c| {
                let mut qs = [0u8; 16];
                qs.copy_from_slice(&c[4..20]);
                BlockQ4_1 {
                    d: f16::from_le_bytes([c[0], c[1]]),
                    m: f16::from_le_bytes([c[2], c[3]]),
                    qs,
                }
            })
            .collect();
        Ok(Q4_1Matrix { rows, cols, blocks })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.blocks.len() * 20
    }

    /// `out (m × rows) = x (m × cols) · Wᵀ`.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        let k = self.cols;
        let m = x.len() / k;
        let kb = k / 32;
        debug_assert_eq!(x.len(), m * k);
        debug_assert_eq!(out.len(), m * self.rows);
        let mut xq = vec![
            BlockQ8_1 {
                d: 0.0,
                s: 0.0,
                qs: [0; 32]
            };
            m * kb
        ];
        for (row, q) in x.chunks_exact(k).zip(xq.chunks_exact_mut(kb)) {
            quantize_q8_1(row, q);
        }
        let simd = has_avx2();
        let rows = self.rows;
        let out_ptr = out.as_mut_ptr() as usize;
        let work = |range: std::ops::Range<usize>| {
            for r in range {
                let w = &self.blocks[r * kb..(r + 1) * kb];
                for (i, xrow) in xq.chunks_exact(kb).enumerate() {
                    let v = if simd {
                        // SAFETY: AVX2 and FMA were detected at run time.
                        unsafe { dot_avx2(w, xrow) }
                    } else {
                        dot_scalar(w, xrow)
                    };
                    // SAFETY: each (i, r) is written by exactly one work item, inside `out`.
                    unsafe { *(out_ptr as *mut f32).add(i * rows + r) = v };
                }
            }
        };
        candle_core::utils::barrier_pool().execute_chunked(rows, work);
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    for (xs, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(xs) {
            let r = (v * id).round() as i32;
            *q = r as i8;
            sum += r;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

fn dot_scalar(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    let mut acc = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let mut sum = 0i32;
        for j in 0..16 {
            let lo = i32::from(wb.qs[j] & 0x0F);
            let hi = i32::from(wb.qs[j] >> 4);
            sum += lo * i32::from(xb.qs[j]) + hi * i32::from(xb.qs[j + 16]);
        }
        acc += wb.d.to_f32() * xb.d * sum as f32 + wb.m.to_f32() * xb.s;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for (wb, xb) in w.iter().zip(x) {
        summs += wb.m.to_f32() * xb.s;
        let d = _mm256_set1_ps(wb.d.to_f32() * xb.d);
        // SAFETY: 16 and 32 readable bytes; unaligned loads.
        let (packed, qx) = unsafe {
            (
                _mm_loadu_si128(wb.qs.as_ptr() as *const __m128i),
                _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i),
            )
        };
        // Low nibbles (values 0..16) in the low lane, high nibbles (16..32) in the high lane.
        let qw = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
        let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), ones);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(prod), acc);
    }
    let hi = _mm256_extractf128_ps(acc, 1);
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s) + summs
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_avx2(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    dot_scalar(w, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_the_dequantised_product() {
        let (rows, cols, m) = (37, 96, 3);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let mat = Q4_1Matrix::from_bytes(&q.data().unwrap(), rows, cols).unwrap();
        let wd = q.dequantize(&Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap();
        let exact: Vec<Vec<f32>> = x.matmul(&wd.t().unwrap()).unwrap().to_vec2().unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut out = vec![0f32; m * rows];
        mat.matmul(&xs, &mut out);
        // Same result through the portable path.
        let mut xq = vec![
            BlockQ8_1 {
                d: 0.0,
                s: 0.0,
                qs: [0; 32]
            };
            m * cols / 32
        ];
        for (row, qq) in xs.chunks_exact(cols).zip(xq.chunks_exact_mut(cols / 32)) {
            quantize_q8_1(row, qq);
        }
        for i in 0..m {
            for r in 0..rows {
                let got = out[i * rows + r];
                let want = exact[i][r];
                // 8-bit activations: a small error against sums of magnitude ~10.
                assert!((got - want).abs() < 0.3, "{i},{r}: {got} vs {want}");
                let w = &mat.blocks[r * cols / 32..(r + 1) * cols / 32];
                let scalar = dot_scalar(w, &xq[i * cols / 32..(i + 1) * cols / 32]);
                assert!(
                    (got - scalar).abs() < 1e-3 * (1.0 + scalar.abs()),
                    "simd {got} vs scalar {scalar}"
                );
            }
        }
    }
}

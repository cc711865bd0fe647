//! Matrix products of GGUF-quantised weights (Q4_0, Q4_1, Q8_0) with **float32
//! activations**, for the CPU: AVX-512 or AVX2 + FMA when the processor has them (detected at
//! run time), a portable loop otherwise.
//!
//! candle (like llama.cpp) quantises the activations to 8 bits before each quantised matmul.
//! On a model as small as SmolLM2-135M that second rounding is visible: greedy answers drift
//! from what the same weights give in float (the capital of France stops being Paris). Here
//! the weights are expanded block by block in registers and multiplied with the activations
//! as they are, so the GGUF path computes what its de-quantised form computes (to float
//! rounding), while reading only the quantised bytes per token. Where the processor has
//! AVX-512 VNNI, Q4_0/Q4_1/Q8_0 run on [`vnni`]'s integer kernels instead (activations rounded
//! to 16 bits, not 8, per block: the same answers, twice the arithmetic rate).

use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use half::f16;

use super::vnni;

/// A plain-old-data value a weight file may hold (`u8` quants, `f32` scales and values).
pub(crate) trait Pod: Copy + Send + Sync + 'static {}
impl Pod for u8 {}
impl Pod for f32 {}

/// Weight data: owned, or borrowed from a memory-mapped file (the quantised-weights cache),
/// which the kernels read in place — a cached model costs no copy and no anonymous memory.
pub(crate) enum Buf<T: Pod> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
        _t: PhantomData<T>,
    },
}

impl<T: Pod> Buf<T> {
    /// `len` values at `offset` bytes into `map`; `None` when they do not fit or are not
    /// aligned for `T`.
    pub fn mapped(map: Arc<memmap2::Mmap>, offset: usize, len: usize) -> Option<Buf<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        let end = offset.checked_add(bytes)?;
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<T>());
        (end <= map.len() && aligned).then_some(Buf::Mapped {
            map,
            offset,
            len,
            _t: PhantomData,
        })
    }
}

impl<T: Pod> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            // SAFETY: `mapped` checked that `len` values of `T` fit in the map from `offset`
            // and that the address is aligned for `T`; `T` is plain data (any bit pattern is
            // a value); the map is read-only and lives as long as this `Buf` (the `Arc`). The
            // cache file is written once to a temporary name and renamed: never changed in
            // place while mapped.
            Buf::Mapped {
                map, offset, len, ..
            } => unsafe { std::slice::from_raw_parts(map.as_ptr().add(*offset).cast::<T>(), *len) },
        }
    }
}

/// The block formats these kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Format {
    /// `x = d·(q − 8)`, `q` in 0..16: 18 bytes per 32 values.
    Q4_0,
    /// `x = d·q + m`, `q` in 0..16: 20 bytes per 32 values.
    Q4_1,
    /// `x = d·q`, `q` in −128..128: 34 bytes per 32 values.
    Q8_0,
    /// Plain float32 rows (a Hugging Face model's weights), so that such models run the same
    /// layer loop.
    F32,
    /// ggml's K-quants, kept in their own 256-value super-blocks (`qs` holds the blocks as
    /// stored; the 6-bit sub-block scales are decoded per super-block in the dot): the
    /// formats most downloaded GGUFs use (Q4_K_M = Q4_K + Q6_K, Q5_K_M). `x = d·sc·q − dmin·m`,
    /// 144 bytes per 256 values.
    Q4K,
    /// `x = d·sc·q + (high bit)·16·d·sc − dmin·m`: 176 bytes per 256 values.
    Q5K,
    /// `x = d·sc·(q − 32)`, 6-bit `q`, 8-bit scales per 16 values: 210 bytes per 256 values.
    Q6K,
}

impl Format {
    /// Bytes of one block as stored in a GGUF.
    fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
            Format::F32 => 128,
            Format::Q4K => 144,
            Format::Q5K => 176,
            Format::Q6K => 210,
        }
    }

    /// Values per block: 32, or a K-quant's 256.
    fn block_values(self) -> usize {
        if self.is_k() { 256 } else { 32 }
    }

    fn is_k(self) -> bool {
        matches!(self, Format::Q4K | Format::Q5K | Format::Q6K)
    }

    /// A K-quant super-block's bytes in the kernels' layout: the 6-bit scales and minimums
    /// unpacked to bytes (Q4_K/Q5_K: 8 + 8, then `qh` and the nibbles as stored); Q6_K as
    /// stored without its half-float scale. The half-float scales go to `d` as f32.
    fn kq_bytes(self) -> usize {
        match self {
            Format::Q4K => 16 + 128,
            Format::Q5K => 16 + 32 + 128,
            Format::Q6K => 208,
            _ => 0,
        }
    }

    /// f32 scales per K-quant super-block: `d` and `dmin`, or Q6_K's `d`.
    fn kd_len(self) -> usize {
        match self {
            Format::Q4K | Format::Q5K => 2,
            Format::Q6K => 1,
            _ => 0,
        }
    }

    /// The kernels' format for a GGUF tensor type, when they have one.
    pub fn from_ggml(t: candle_core::quantized::GgmlDType) -> Option<Format> {
        use candle_core::quantized::GgmlDType as G;
        Some(match t {
            G::Q4_0 => Format::Q4_0,
            G::Q4_1 => Format::Q4_1,
            G::Q8_0 => Format::Q8_0,
            G::Q4K => Format::Q4K,
            G::Q5K => Format::Q5K,
            G::Q6K => Format::Q6K,
            _ => return None,
        })
    }

    /// The GGUF tensor type of a quantised format.
    pub fn ggml(self) -> Option<candle_core::quantized::GgmlDType> {
        use candle_core::quantized::GgmlDType as G;
        Some(match self {
            Format::Q4_0 => G::Q4_0,
            Format::Q4_1 => G::Q4_1,
            Format::Q8_0 => G::Q8_0,
            Format::Q4K => G::Q4K,
            Format::Q5K => G::Q5K,
            Format::Q6K => G::Q6K,
            Format::F32 => return None,
        })
    }
}

/// A quantised weight matrix, `rows × cols`, row-major, split at load into the block
/// quants (`qs`: 16 or 32 bytes per 32 values) and float32 scales (`d`) and offsets (`m`:
/// Q4_1's minimum; Q4_0's offset is `−8·d`, computed, not stored: 20 bytes a block, where
/// storing it would take 24 and decode reads every byte once per token), so the inner loop
/// converts no half floats.
pub(crate) struct QuantMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    qs: Buf<u8>,
    d: Buf<f32>,
    m: Buf<f32>,
    /// [`Format::F32`]'s values (`rows × cols`); empty otherwise.
    f: Buf<f32>,
    /// The blocks interleaved for the integer kernels ([`vnni`]), made the first time the
    /// matrix multiplies on a processor that runs them (Q4_0, Q4_1, Q8_0 only).
    packed: OnceLock<Option<vnni::Packed>>,
}

/// The stored parts of a [`QuantMatrix`] (what the quantised-weights cache writes).
pub(crate) struct Parts<'a> {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    pub qs: &'a [u8],
    pub d: &'a [f32],
    pub m: &'a [f32],
    pub f: &'a [f32],
}

impl QuantMatrix {
    /// From the raw GGUF bytes of a tensor.
    pub fn from_bytes(
        format: Format,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> anyhow::Result<QuantMatrix> {
        if format == Format::F32 {
            anyhow::bail!("F32 weights come through `QuantMatrix::from_f32`");
        }
        let bv = format.block_values();
        if !cols.is_multiple_of(bv) {
            anyhow::bail!("{format:?} rows of {cols} values are not whole blocks");
        }
        let bb = format.block_bytes();
        let n = rows * cols / bv;
        if bytes.len() != n * bb {
            anyhow::bail!("{} bytes for {rows}×{cols} {format:?} values", bytes.len());
        }
        if format.is_k() {
            let mut qs = Vec::with_capacity(n * format.kq_bytes());
            let mut ds = Vec::with_capacity(n * format.kd_len());
            for blk in bytes.chunks_exact(bb) {
                if format == Format::Q6K {
                    qs.extend_from_slice(&blk[..208]);
                    ds.push(f16_at(blk, 208));
                } else {
                    ds.push(f16_at(blk, 0));
                    ds.push(f16_at(blk, 2));
                    let (sc, ms): (Vec<u8>, Vec<u8>) =
                        (0..8).map(|j| scale_min_k4(j, &blk[4..16])).unzip();
                    qs.extend_from_slice(&sc);
                    qs.extend_from_slice(&ms);
                    qs.extend_from_slice(&blk[16..]);
                }
            }
            return Ok(QuantMatrix {
                format,
                rows,
                cols,
                qs: Buf::Owned(qs),
                d: Buf::Owned(ds),
                m: Buf::Owned(Vec::new()),
                f: Buf::Owned(Vec::new()),
                packed: OnceLock::new(),
            });
        }
        let mut qs = Vec::with_capacity(n * format.quant_bytes());
        let mut ds = Vec::with_capacity(n);
        let mut ms = Vec::with_capacity(if format == Format::Q4_1 { n } else { 0 });
        for blk in bytes.chunks_exact(bb) {
            let d = f16_at(blk, 0);
            ds.push(d);
            match format {
                Format::Q8_0 => qs.extend_from_slice(&blk[2..34]),
                Format::Q4_0 => qs.extend_from_slice(&blk[2..18]),
                Format::Q4_1 => {
                    ms.push(f16_at(blk, 2));
                    qs.extend_from_slice(&blk[4..20]);
                }
                Format::F32 | Format::Q4K | Format::Q5K | Format::Q6K => {}
            }
        }
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            qs: Buf::Owned(qs),
            d: Buf::Owned(ds),
            m: Buf::Owned(ms),
            f: Buf::Owned(Vec::new()),
            packed: OnceLock::new(),
        })
    }

    /// From stored parts (the quantised-weights cache), checked against the shape.
    pub fn from_parts(
        format: Format,
        rows: usize,
        cols: usize,
        qs: Buf<u8>,
        d: Buf<f32>,
        m: Buf<f32>,
        f: Buf<f32>,
    ) -> anyhow::Result<QuantMatrix> {
        let (blocks, ok) = if format == Format::F32 {
            (
                0,
                f.len() == rows * cols && qs.is_empty() && d.is_empty() && m.is_empty(),
            )
        } else if format.is_k() {
            let n = rows * cols / 256;
            (
                n,
                cols.is_multiple_of(256)
                    && qs.len() == n * format.kq_bytes()
                    && d.len() == n * format.kd_len()
                    && m.is_empty()
                    && f.is_empty(),
            )
        } else {
            let n = rows * cols / 32;
            let m_len = if format == Format::Q4_1 { n } else { 0 };
            (
                n,
                cols.is_multiple_of(32)
                    && qs.len() == n * format.quant_bytes()
                    && d.len() == n
                    && m.len() == m_len
                    && f.is_empty(),
            )
        };
        if !ok {
            anyhow::bail!(
                "stored parts do not make a {rows}×{cols} {format:?} matrix ({blocks} blocks)"
            );
        }
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            qs,
            d,
            m,
            f,
            packed: OnceLock::new(),
        })
    }

    /// The stored parts (for the quantised-weights cache).
    pub fn parts(&self) -> Parts<'_> {
        // The cache is written before a model is placed (and packed).
        debug_assert!(!self.only_packed(), "a packed matrix has no stored parts");
        Parts {
            format: self.format,
            rows: self.rows,
            cols: self.cols,
            qs: &self.qs,
            d: &self.d,
            m: &self.m,
            f: &self.f,
        }
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The matrix in its GGUF block layout again (the half-float scales were stored as f32
    /// from half floats, so this is exact): for moving it onto candle's kernels (another
    /// device). `None` for [`Format::F32`], whose values are [`Parts::f`].
    pub fn ggml_bytes(&self) -> Option<Vec<u8>> {
        if self.format == Format::F32 {
            return None;
        }
        if self.format.is_k() {
            let (kq, kd) = (self.format.kq_bytes(), self.format.kd_len());
            let mut out = Vec::with_capacity(self.qs.len() / kq * self.format.block_bytes());
            for (q, d) in self.qs.chunks_exact(kq).zip(self.d.chunks_exact(kd)) {
                if self.format == Format::Q6K {
                    out.extend_from_slice(q);
                    out.extend_from_slice(&f16::from_f32(d[0]).to_le_bytes());
                } else {
                    out.extend_from_slice(&f16::from_f32(d[0]).to_le_bytes());
                    out.extend_from_slice(&f16::from_f32(d[1]).to_le_bytes());
                    out.extend_from_slice(&pack_scale_min_k4(&q[..8], &q[8..16]));
                    out.extend_from_slice(&q[16..]);
                }
            }
            return Some(out);
        }
        let qb = self.format.quant_bytes();
        let unpacked = match self.packed.get() {
            Some(Some(p)) if self.only_packed() => Some(p.unpack(0..self.rows)),
            _ => None,
        };
        let (qs, ds, ms): (&[u8], &[f32], &[f32]) = match &unpacked {
            Some((q, d, m)) => (q, d, m),
            None => (&self.qs, &self.d, &self.m),
        };
        let mut out = Vec::with_capacity(ds.len() * self.format.block_bytes());
        for (b, (q, d)) in qs.chunks_exact(qb).zip(ds.iter()).enumerate() {
            out.extend_from_slice(&f16::from_f32(*d).to_le_bytes());
            if self.format == Format::Q4_1 {
                out.extend_from_slice(&f16::from_f32(ms[b]).to_le_bytes());
            }
            out.extend_from_slice(q);
        }
        Some(out)
    }

    /// Rows `ids` as floats, one after the other (an embedding lookup).
    pub fn rows_f32(&self, ids: &[u32]) -> anyhow::Result<Vec<f32>> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            let r = id as usize;
            if r >= self.rows {
                anyhow::bail!("token {id} is outside the vocabulary of {}", self.rows);
            }
            self.with_row(r, |row| row.dequantize(o));
        }
        Ok(out)
    }

    /// `‖row‖²` of every row (de-quantised; summed in f64), on the matmul thread pool: what
    /// a DoRA's gains need of the base weights.
    pub fn row_norms_sq(&self) -> Vec<f32> {
        let norms: Vec<AtomicU32> = (0..self.rows).map(|_| AtomicU32::new(0)).collect();
        candle_core::utils::barrier_pool().execute_chunked(self.rows, |range| {
            let mut buf = vec![0f32; self.cols];
            for r in range {
                self.with_row(r, |row| row.dequantize(&mut buf));
                let n: f64 = buf.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
                norms[r].store((n as f32).to_bits(), Ordering::Relaxed);
            }
        });
        norms
            .into_iter()
            .map(|n| f32::from_bits(n.into_inner()))
            .collect()
    }

    /// A float32 matrix (`rows × cols` values, row-major).
    pub fn from_f32(values: Vec<f32>, rows: usize, cols: usize) -> anyhow::Result<QuantMatrix> {
        if values.len() != rows * cols {
            anyhow::bail!("{} values for a {rows}×{cols} matrix", values.len());
        }
        Ok(QuantMatrix {
            format: Format::F32,
            rows,
            cols,
            qs: Buf::Owned(Vec::new()),
            d: Buf::Owned(Vec::new()),
            m: Buf::Owned(Vec::new()),
            f: Buf::Owned(values),
            packed: OnceLock::new(),
        })
    }

    /// How the activations meet the weights: "16-bit integer" where the integer kernels run
    /// ([`vnni`]), "float" otherwise.
    pub fn activations(&self) -> &'static str {
        if self.packed().is_some() {
            "16-bit integer"
        } else {
            "float"
        }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes held (quants and float scales).
    pub fn bytes(&self) -> usize {
        self.qs.len()
            + 4 * (self.d.len() + self.m.len() + self.f.len())
            + self
                .packed
                .get()
                .and_then(|p| p.as_ref())
                .map_or(0, vnni::Packed::bytes)
    }

    /// Where the integer kernels run: interleave the blocks now and drop the matrix's own
    /// copy of them, so that the weights are held once (for a matrix that is not shared — a
    /// tied embedding keeps both, its rows are looked up). Row reads ([`QuantMatrix::rows_f32`],
    /// [`QuantMatrix::row_norms_sq`], [`QuantMatrix::ggml_bytes`]) then unpack what they need.
    pub fn pack_in_place(&mut self) {
        if self.packed().is_none() {
            return;
        }
        self.qs = Buf::Owned(Vec::new());
        self.d = Buf::Owned(Vec::new());
        self.m = Buf::Owned(Vec::new());
    }

    /// Whether the blocks are held only interleaved ([`QuantMatrix::pack_in_place`]).
    fn only_packed(&self) -> bool {
        self.d.is_empty()
            && self.rows * self.cols > 0
            && !self.format.is_k()
            && self.format != Format::F32
    }

    /// `f(row r)`, unpacking the row first where the blocks are held only interleaved.
    fn with_row<T>(&self, r: usize, f: impl FnOnce(Row<'_>) -> T) -> T {
        match self.packed.get() {
            Some(Some(p)) if self.only_packed() => {
                let (qs, d, m) = p.unpack(r..r + 1);
                f(Row {
                    format: self.format,
                    qs: &qs,
                    d: &d,
                    m: &m,
                    f: &[],
                })
            }
            _ => f(self.row(r)),
        }
    }

    /// The interleaved blocks for the integer kernels, made on first use; `None` where the
    /// processor or the format has none.
    fn packed(&self) -> Option<&vnni::Packed> {
        if !matches!(self.format, Format::Q4_0 | Format::Q4_1 | Format::Q8_0) || !vnni::available()
        {
            return None;
        }
        self.packed
            .get_or_init(|| {
                Some(vnni::Packed::new(
                    self.format,
                    self.rows,
                    self.cols,
                    &self.qs,
                    &self.d,
                    &self.m,
                ))
            })
            .as_ref()
    }

    fn row(&self, r: usize) -> Row<'_> {
        if self.format == Format::F32 {
            return Row {
                format: self.format,
                qs: &[],
                d: &[],
                m: &[],
                f: &self.f[r * self.cols..(r + 1) * self.cols],
            };
        }
        if self.format.is_k() {
            let nb = self.cols / 256;
            let (len, dl) = (nb * self.format.kq_bytes(), nb * self.format.kd_len());
            return Row {
                format: self.format,
                qs: &self.qs[r * len..(r + 1) * len],
                d: &self.d[r * dl..(r + 1) * dl],
                m: &[],
                f: &[],
            };
        }
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
            f: &[],
        }
    }

    /// `out (m × rows) = x (m × cols) · Wᵀ`, plus `x · Aᵀ · B` when `low_rank` is given — a
    /// LoRA term, added inside the same parallel pass.
    pub fn matmul(&self, x: &[f32], out: &mut [f32], low_rank: Option<LowRank<'_>>) {
        let m = x.len() / self.cols.max(1);
        match low_rank {
            None => self.matmul_rows(x, out, &[]),
            Some(l) => self.matmul_rows(x, out, &vec![Some(l); m]),
        }
    }

    /// [`QuantMatrix::matmul`] where each position (row of `x`) has its own low-rank term
    /// (`lows[i]`, or none; `lows` empty: none at all) — the rows of a batch that use
    /// different adapters share one pass over the weights (S-LoRA's and Punica's idea: the
    /// base matmul is shared, each row adds its own adapter's `x·Aᵀ·B`).
    pub fn matmul_rows(&self, x: &[f32], out: &mut [f32], lows: &[Option<LowRank<'_>>]) {
        let k = self.cols;
        let m = x.len() / k;
        debug_assert_eq!(x.len(), m * k);
        debug_assert_eq!(out.len(), m * self.rows);
        debug_assert!(lows.is_empty() || lows.len() == m);
        let simd = simd_level();
        // Where the processor has VNNI: the integer kernels, over the interleaved blocks,
        // with the activations quantised per block once here.
        let int8 = self
            .packed()
            .map(|p| (p, vnni::QuantX::new(self.format, x, k)));
        // Per block of 32 activations: their sum (for the offsets of Q4_0 and Q4_1 on the
        // paths that add them apart).
        let sums: Vec<f32> = if simd == Simd::Avx512 && m == 1 || int8.is_some() {
            Vec::new()
        } else {
            x.chunks_exact(32).map(|c| c.iter().sum()).collect()
        };
        // The low-rank terms: the dots `s = x_i·Aᵀ` of every position with a term (R of them
        // for its adapter's rank R) are the first work items of the parallel pass (claimed from
        // a shared counter); each chunk of output rows then adds `Σ_j s_j · B_j` over its own
        // rows, vectorised along the rows, once every `s` is in. A work item is a block of
        // ranks of one adapter for every position that uses it (the rows of A are read once for
        // them all, and the counters are touched once per block, not once per dot: tiny items
        // cost more in the threads' shared cache lines than their arithmetic).
        let lows: Vec<Option<LowRank<'_>>> =
            lows.iter().map(|l| l.filter(|l| !l.b.is_empty())).collect();
        // Position i's dots are s_bits[first[i]..first[i + 1]].
        let mut first = Vec::with_capacity(m + 1);
        let mut n_a = 0;
        // Positions grouped by adapter (the same `A`), in order of first use.
        let mut groups: Vec<(usize, usize, Vec<usize>)> = Vec::new();
        for i in 0..m {
            first.push(n_a);
            if let Some(Some(l)) = lows.get(i) {
                n_a += l.b.len();
                let key = l.a.as_ptr() as usize;
                match groups.iter_mut().find(|g| g.0 == key) {
                    Some(g) => g.2.push(i),
                    None => groups.push((key, l.b.len(), vec![i])),
                }
            }
        }
        first.push(n_a);
        const RANK_BLOCK: usize = 8;
        // (group, first rank, end rank)
        let items: Vec<(usize, usize, usize)> = groups
            .iter()
            .enumerate()
            .flat_map(|(g, (_, ranks, _))| {
                (0..*ranks)
                    .step_by(RANK_BLOCK)
                    .map(move |j| (g, j, (j + RANK_BLOCK).min(*ranks)))
            })
            .collect();
        let any_low = n_a > 0;
        let s_bits: Vec<AtomicU32> = (0..n_a).map(|_| AtomicU32::new(0)).collect();
        let (a_next, a_done) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let low_rank_dots = || {
            loop {
                let it = a_next.fetch_add(1, Ordering::Relaxed);
                let Some(&(g, j0, j1)) = items.get(it) else {
                    break;
                };
                for &i in &groups[g].2 {
                    let Some(l) = lows[i] else { continue };
                    let xi = &x[i * k..(i + 1) * k];
                    for j in j0..j1 {
                        let v = dot_f32(&l.a[j * k..(j + 1) * k], xi, simd);
                        s_bits[first[i] + j].store(v.to_bits(), Ordering::Relaxed);
                    }
                }
                a_done.fetch_add(1, Ordering::Release);
            }
        };
        let n_items = items.len();
        let rows = self.rows;
        let out_ptr = out.as_mut_ptr() as usize;
        let nb = k / 32;
        let work = |range: std::ops::Range<usize>| {
            // SAFETY: each output row `r` (of every position) is written by exactly one work
            // item, and lies inside `out`.
            let at = |i: usize, r: usize| unsafe { (out_ptr as *mut f32).add(i * rows + r) };
            #[cfg(target_arch = "x86_64")]
            if let Some((p, xq)) = &int8 {
                let groups = range.start / vnni::GROUP..range.end.div_ceil(vnni::GROUP);
                // SAFETY: `packed` is only made where `vnni::available`; `xq` was quantised
                // for this format and width from `x` (m positions); work items are whole
                // groups (ranges start at multiples of GROUP), so the rows written are this
                // item's, and `at` is in `out` for every row below `rows`.
                unsafe { vnni::rows(p, xq, groups, rows, m, &at) };
            }
            if int8.is_some() {
                // Done above.
            } else if m == 1 {
                // Four rows at a time where there is a kernel for it (one activation load and
                // one call serve four rows), then one at a time.
                let mut r = range.start;
                #[cfg(target_arch = "x86_64")]
                if simd == Simd::Avx512
                    && matches!(self.format, Format::Q4_0 | Format::Q4_1 | Format::Q8_0)
                {
                    while r + 4 <= range.end {
                        let v = self.dot4_avx512(r, x);
                        for (j, v) in v.into_iter().enumerate() {
                            // SAFETY: see `at`.
                            unsafe { *at(0, r + j) = v };
                        }
                        r += 4;
                    }
                }
                for r in r..range.end {
                    let sums = if sums.is_empty() {
                        &[][..]
                    } else {
                        &sums[..nb]
                    };
                    // SAFETY: see `at`.
                    unsafe { *at(0, r) = self.row(r).dot(x, sums, simd) };
                }
            } else {
                // Several positions: expand up to 4 rows at a time, then float dots of those
                // rows with 4 (AVX-512: 16 of its 32 registers accumulate) or 3 (AVX2: 12 of
                // its 16) positions at a time, so each weight and activation load serves several
                // products.
                let group = if simd == Simd::Avx512 { 4 } else { 3 };
                let mut dense = vec![0f32; 4 * k];
                let mut r0 = range.start;
                while r0 < range.end {
                    let n_rows = (range.end - r0).min(4);
                    for j in 0..n_rows {
                        self.row(r0 + j).dequantize(&mut dense[j * k..(j + 1) * k]);
                    }
                    let mut i = 0;
                    while i < m {
                        let np = (m - i).min(group);
                        let mut res = [[0f32; 4]; 4];
                        let w = &dense[..n_rows * k];
                        dots_block(w, &x[i * k..(i + np) * k], k, &mut res, simd);
                        for (p, row) in res.iter().enumerate().take(np) {
                            for (j, v) in row.iter().enumerate().take(n_rows) {
                                // SAFETY: see `at`.
                                unsafe { *at(i + p, r0 + j) = *v };
                            }
                        }
                        i += np;
                    }
                    r0 += n_rows;
                }
            }
            if any_low {
                // Every dot was claimed before any row chunk; wait for the last ones.
                while a_done.load(Ordering::Acquire) < n_items {
                    std::hint::spin_loop();
                }
                // Per adapter, up to four of its positions at a time: each row of `B` is
                // read once for them all.
                for (_, _, members) in &groups {
                    let Some(low) = lows[members[0]] else {
                        continue;
                    };
                    for chunk in members.chunks(LOW_RANK_POSITIONS) {
                        let mut outs = [std::ptr::null_mut(); LOW_RANK_POSITIONS];
                        for (o, &i) in outs.iter_mut().zip(chunk) {
                            *o = at(i, range.start);
                        }
                        let s = |p: usize, j: usize| {
                            f32::from_bits(s_bits[first[chunk[p]] + j].load(Ordering::Relaxed))
                        };
                        // SAFETY: rows `range` of these positions belong to this work item;
                        // `outs[p]` is row `range.start` of position `chunk[p]`.
                        unsafe { low.add_rows(s, range.clone(), &outs[..chunk.len()], simd) };
                    }
                    if let Some(g) = low.gains {
                        for &i in members {
                            // SAFETY: as above.
                            let o = unsafe {
                                std::slice::from_raw_parts_mut(at(i, range.start), range.len())
                            };
                            for (v, g) in o.iter_mut().zip(&g[range.clone()]) {
                                *v *= g;
                            }
                        }
                    }
                }
            }
        };
        if rows * m * k < 1 << 16 {
            low_rank_dots();
            work(0..rows);
        } else {
            let pool = candle_core::utils::barrier_pool();
            let threads = pool.n_workers() + 1;
            // Work items are whole groups of the integer kernels' interleaved rows.
            let unit = if int8.is_some() { vnni::GROUP } else { 4 };
            let cursor = AtomicUsize::new(0);
            pool.execute(|_| {
                low_rank_dots();
                // Guided chunks: large first, smaller toward the end (multiples of 4 rows, the
                // kernels' group), so that the threads finish together.
                let mut cur = cursor.load(Ordering::Relaxed);
                while cur < rows {
                    let chunk = ((rows - cur) / (2 * threads))
                        .next_multiple_of(unit)
                        .max(unit);
                    let end = (cur + chunk).min(rows);
                    match cursor.compare_exchange_weak(
                        cur,
                        end,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => {
                            work(cur..end);
                            cur = cursor.load(Ordering::Relaxed);
                        }
                        Err(now) => cur = now,
                    }
                }
            });
        }
    }
}

/// Positions whose low-rank terms one pass over `B` adds at once.
const LOW_RANK_POSITIONS: usize = 4;

/// A LoRA term for [`QuantMatrix::matmul`]: `A` (R × cols, row-major) and, per rank, the scaled
/// row of `B` restricted to the output rows it touches (`(first row, values)`; the other rows
/// of a fused projection are zeros and are skipped). A DoRA also has `gains`, one per output
/// row: the row's whole output (`W·x` plus the term) is multiplied by it.
#[derive(Clone, Copy)]
pub(crate) struct LowRank<'a> {
    pub a: &'a [f32],
    pub b: &'a [(usize, Vec<f32>)],
    pub gains: Option<&'a [f32]>,
}

impl LowRank<'_> {
    /// `o_p += Σ_j s(p, j) · B_j` over the output rows `range`, for each position `p` of
    /// `outs` (`outs[p]` points at row `range.start` of its output; at most
    /// [`LOW_RANK_POSITIONS`]). Consecutive ranks that cover the same rows (one projection's,
    /// in a fused matrix) are summed in registers, 64 rows at a time, before one update of
    /// each output (rather than one pass over it per rank), and each tile of `B` is loaded
    /// once for all the positions.
    ///
    /// # Safety
    /// Each `outs[p]` is valid for `range.len()` values, and no other thread touches them.
    unsafe fn add_rows(
        &self,
        s: impl Fn(usize, usize) -> f32,
        range: std::ops::Range<usize>,
        outs: &[*mut f32],
        simd: Simd,
    ) {
        let mut j0 = 0;
        while j0 < self.b.len() {
            let (first, len) = (self.b[j0].0, self.b[j0].1.len());
            let mut j1 = j0 + 1;
            while j1 < self.b.len() && self.b[j1].0 == first && self.b[j1].1.len() == len {
                j1 += 1;
            }
            let (lo, hi) = (range.start.max(first), range.end.min(first + len));
            if lo < hi {
                let ranks = &self.b[j0..j1];
                let at = lo - range.start;
                #[cfg(target_arch = "x86_64")]
                if simd == Simd::Avx512 {
                    let s = |p: usize, j: usize| s(p, j0 + j);
                    // SAFETY: AVX-512F was detected at run time; every rank's row holds
                    // `first..first + len`, which contains `lo..hi`; each output holds
                    // `at + (hi - lo)` values (the caller's promise).
                    unsafe {
                        match outs.len() {
                            1 => {
                                low_rank_rows_avx512::<1>(&s, ranks, lo - first, outs, at, hi - lo)
                            }
                            2 => {
                                low_rank_rows_avx512::<2>(&s, ranks, lo - first, outs, at, hi - lo)
                            }
                            3 => {
                                low_rank_rows_avx512::<3>(&s, ranks, lo - first, outs, at, hi - lo)
                            }
                            _ => {
                                low_rank_rows_avx512::<4>(&s, ranks, lo - first, outs, at, hi - lo)
                            }
                        }
                    }
                    j0 = j1;
                    continue;
                }
                for (p, &op) in outs.iter().enumerate() {
                    // SAFETY: the caller's promise.
                    let o = unsafe { std::slice::from_raw_parts_mut(op.add(at), hi - lo) };
                    for (j, (_, b)) in ranks.iter().enumerate() {
                        let sj = s(p, j0 + j);
                        if sj != 0.0 {
                            axpy(sj, &b[lo - first..hi - first], o, simd);
                        }
                    }
                }
            }
            j0 = j1;
        }
    }

    /// `out (m × rows) += x (m × cols) · Aᵀ · B` on this thread, one row at a time: what
    /// the fused pass computes, written plainly (the tests' reference; weights on candle's
    /// kernels use `LoraPair::term`).
    #[cfg(test)]
    pub(crate) fn add_to(&self, x: &[f32], out: &mut [f32]) {
        let ranks = self.b.len();
        if ranks == 0 {
            return;
        }
        let k = self.a.len() / ranks;
        let rows = out.len() / (x.len() / k).max(1);
        for (xr, o) in x.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
            let s: Vec<f32> = self
                .a
                .chunks_exact(k)
                .map(|ar| ar.iter().zip(xr).map(|(a, x)| a * x).sum())
                .collect();
            for (sj, (first, b)) in s.iter().zip(self.b) {
                for (o, b) in o[*first..first + b.len()].iter_mut().zip(b) {
                    *o += sj * b;
                }
            }
        }
    }
}

impl QuantMatrix {
    /// Rows `r..r+4` times `x` (one position) with the AVX-512 kernels.
    #[cfg(target_arch = "x86_64")]
    fn dot4_avx512(&self, r: usize, x: &[f32]) -> [f32; 4] {
        let nb = self.cols / 32;
        let qb = self.format.quant_bytes();
        assert!((r + 4) * nb <= self.d.len() && x.len() >= nb * 32);
        let qs = &self.qs[r * nb * qb..(r + 4) * nb * qb];
        let d = &self.d[r * nb..(r + 4) * nb];
        // SAFETY: AVX-512F was detected at run time (the caller checked `simd_level`); the
        // slices hold exactly 4 rows of `nb` blocks, and `x` at least `nb` blocks.
        unsafe {
            match self.format {
                Format::Q8_0 => dot4_q8_0_avx512(qs, d, nb, x),
                Format::Q4_0 => dot4_q4_avx512::<false>(qs, d, &[], nb, x),
                _ => dot4_q4_avx512::<true>(qs, d, &self.m[r * nb..(r + 4) * nb], nb, x),
            }
        }
    }
}

impl Format {
    fn quant_bytes(self) -> usize {
        match self {
            Format::Q4_0 | Format::Q4_1 => 16,
            Format::Q8_0 => 32,
            // The K-quants keep whole blocks (`block_bytes`).
            Format::F32 | Format::Q4K | Format::Q5K | Format::Q6K => 0,
        }
    }
}

/// One row of a [`QuantMatrix`].
struct Row<'a> {
    format: Format,
    qs: &'a [u8],
    d: &'a [f32],
    m: &'a [f32],
    f: &'a [f32],
}

impl Row<'_> {
    /// Block `b`'s offset: Q4_1's stored minimum, Q4_0's `−8·d`.
    fn offset(&self, b: usize) -> f32 {
        if self.format == Format::Q4_0 {
            -8.0 * self.d[b]
        } else {
            self.m[b]
        }
    }

    /// The row's values as floats (exactly what de-quantising the tensor gives).
    fn dequantize(&self, out: &mut [f32]) {
        if self.format == Format::F32 {
            out.copy_from_slice(self.f);
            return;
        }
        if self.format.is_k() {
            let (kq, kd) = (self.format.kq_bytes(), self.format.kd_len());
            for ((q, d), o) in self
                .qs
                .chunks_exact(kq)
                .zip(self.d.chunks_exact(kd))
                .zip(out.chunks_exact_mut(256))
            {
                let o: &mut [f32; 256] = o.try_into().unwrap_or_else(|_| unreachable!());
                dequant_k(self.format, q, d, o);
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if simd_level() == Simd::Avx512
            && matches!(self.format, Format::Q8_0 | Format::Q4_0 | Format::Q4_1)
        {
            let nb = out.len() / 32;
            assert!(self.d.len() >= nb && self.qs.len() >= nb * self.format.quant_bytes());
            assert!(self.format != Format::Q4_1 || self.m.len() >= nb);
            // SAFETY: AVX-512F was detected at run time; the slices hold `nb` blocks.
            unsafe { dequant_blocks_avx512(self.format, self.qs, self.d, self.m, out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if simd_level() == Simd::Avx2
            && matches!(self.format, Format::Q8_0 | Format::Q4_0 | Format::Q4_1)
        {
            let nb = out.len() / 32;
            assert!(self.d.len() >= nb && self.qs.len() >= nb * self.format.quant_bytes());
            assert!(self.format != Format::Q4_1 || self.m.len() >= nb);
            // SAFETY: AVX2 and FMA were detected at run time; the slices hold `nb` blocks.
            unsafe { dequant_blocks_avx2(self.format, self.qs, self.d, self.m, out) };
            return;
        }
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
                    let m = self.offset(b);
                    for j in 0..16 {
                        o[j] = d * f32::from(qs[j] & 0x0F) + m;
                        o[j + 16] = d * f32::from(qs[j] >> 4) + m;
                    }
                }
                Format::F32 | Format::Q4K | Format::Q5K | Format::Q6K => {}
            }
        }
    }

    /// `Σ w·x` for one activation row `x` with its block sums.
    fn dot(&self, x: &[f32], sums: &[f32], simd: Simd) -> f32 {
        if self.format == Format::F32 {
            return dot_f32(self.f, x, simd);
        }
        if self.format.is_k() {
            return dot_k(self.format, self.qs, self.d, x, simd);
        }
        #[cfg(target_arch = "x86_64")]
        match simd {
            // SAFETY: AVX-512F (and AVX2 + FMA) were detected at run time; lengths match
            // (checked at load).
            Simd::Avx512 => {
                return unsafe {
                    match self.format {
                        Format::Q8_0 => dot_q8_0_avx512(self.qs, self.d, x),
                        Format::Q4_0 => dot_q4_avx512::<false>(self.qs, self.d, &[], x),
                        Format::Q4_1 => dot_q4_avx512::<true>(self.qs, self.d, self.m, x),
                        _ => dot_f32_avx512(self.f, x),
                    }
                };
            }
            // SAFETY: AVX2 and FMA were detected at run time; lengths match (checked at load).
            Simd::Avx2 => {
                return unsafe {
                    match self.format {
                        Format::Q8_0 => dot_q8_0_avx2(self.qs, self.d, x),
                        Format::Q4_0 => {
                            dot_q4_avx2(self.qs, self.d, x) - 8.0 * dot_f32_avx2(self.d, sums)
                        }
                        Format::Q4_1 => {
                            dot_q4_avx2(self.qs, self.d, x) + dot_f32_avx2(self.m, sums)
                        }
                        _ => dot_f32_avx2(self.f, x),
                    }
                };
            }
            Simd::None => {}
        }
        let _ = simd;
        self.dot_scalar(x, sums)
    }

    fn dot_scalar(&self, x: &[f32], sums: &[f32]) -> f32 {
        if self.format == Format::F32 {
            return self.f.iter().zip(x).map(|(a, b)| a * b).sum();
        }
        if self.format.is_k() {
            return dot_k(self.format, self.qs, self.d, x, Simd::None);
        }
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
                    acc += self.offset(b) * sums[b];
                }
                Format::F32 | Format::Q4K | Format::Q5K | Format::Q6K => {}
            }
            acc += self.d[b] * p;
        }
        acc
    }
}

/// Sub-block `j`'s 6-bit scale and minimum in a Q4_K/Q5_K super-block's 12 packed bytes
/// (ggml's `get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The inverse of [`scale_min_k4`]: 8 scales and 8 minimums (6 bits each) packed into a
/// super-block's 12 bytes.
fn pack_scale_min_k4(sc: &[u8], m: &[u8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        let (s, mm) = (sc[j] & 63, m[j] & 63);
        if j < 4 {
            q[j] |= s;
            q[j + 4] |= mm;
        } else {
            q[j + 4] = (s & 0xF) | ((mm & 0xF) << 4);
            q[j - 4] |= (s >> 4) << 6;
            q[j] |= (mm >> 4) << 6;
        }
    }
    q
}

/// One K-quant super-block's 256 values (the kernels' layout, see [`Format::kq_bytes`]),
/// exactly as ggml (and candle) de-quantise it.
#[inline(always)]
fn dequant_k(format: Format, q: &[u8], d: &[f32], out: &mut [f32; 256]) {
    match format {
        Format::Q4K | Format::Q5K => {
            let (sc, ms) = (&q[..8], &q[8..16]);
            let (qh, ql) = if format == Format::Q5K {
                (&q[16..48], &q[48..176])
            } else {
                (&[][..], &q[16..144])
            };
            for j in 0..4 {
                let (d1, m1) = (d[0] * f32::from(sc[2 * j]), d[1] * f32::from(ms[2 * j]));
                let (d2, m2) = (
                    d[0] * f32::from(sc[2 * j + 1]),
                    d[1] * f32::from(ms[2 * j + 1]),
                );
                let q = &ql[32 * j..32 * j + 32];
                let (lo, hi) = out[64 * j..64 * j + 64].split_at_mut(32);
                if qh.is_empty() {
                    for l in 0..32 {
                        lo[l] = d1 * f32::from(q[l] & 0xF) - m1;
                        hi[l] = d2 * f32::from(q[l] >> 4) - m2;
                    }
                } else {
                    let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                    for l in 0..32 {
                        let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                        let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                        lo[l] = d1 * f32::from((q[l] & 0xF) + h1) - m1;
                        hi[l] = d2 * f32::from((q[l] >> 4) + h2) - m2;
                    }
                }
            }
        }
        Format::Q6K => {
            let (ql, rest) = q.split_at(128);
            let (qh, sc) = rest.split_at(64);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                let y = &mut out[128 * n..128 * n + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                    y[l] = d[0] * f32::from(sc[is] as i8) * f32::from(q1);
                    y[l + 32] = d[0] * f32::from(sc[is + 2] as i8) * f32::from(q2);
                    y[l + 64] = d[0] * f32::from(sc[is + 4] as i8) * f32::from(q3);
                    y[l + 96] = d[0] * f32::from(sc[is + 6] as i8) * f32::from(q4);
                }
            }
        }
        _ => unreachable!("not a K-quant"),
    }
}

/// `Σ w·x` over a K-quant row without AVX-512: each super-block is expanded into 256 floats
/// on the stack and dotted with its activations — float activations, as for the other
/// formats. (candle's K-quant matmul rounds the activations to 8 bits and ran at 0.6×
/// llama.cpp's decode speed on a 1B model in benches/real_models.py; the AVX-512 kernel
/// below reads the blocks in place.)
#[inline(always)]
fn dot_k_with(
    format: Format,
    qs: &[u8],
    d: &[f32],
    x: &[f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
) -> f32 {
    let mut buf = [0f32; 256];
    let mut acc = 0f32;
    for ((q, d), xs) in qs
        .chunks_exact(format.kq_bytes())
        .zip(d.chunks_exact(format.kd_len()))
        .zip(x.chunks_exact(256))
    {
        dequant_k(format, q, d, &mut buf);
        acc += dot(&buf, xs);
    }
    acc
}

fn dot_k(format: Format, qs: &[u8], d: &[f32], x: &[f32], simd: Simd) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: AVX-512F (and AVX2 + FMA) were detected at run time.
        Simd::Avx512 => return unsafe { dot_k_avx512(format, qs, d, x) },
        // SAFETY: AVX2 and FMA were detected at run time.
        Simd::Avx2 => return unsafe { dot_k_avx2(format, qs, d, x) },
        Simd::None => {}
    }
    let _ = simd;
    dot_k_with(format, qs, d, x, |a, b| {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    })
}

/// AVX-512 K-quant dots on the kernels' layout: per super-block the sub-block scales are
/// made in one vector operation; per 32-value sub-block a 16-entry table `d·q − m` is
/// looked up by the nibbles (Q4_K, as `dot_q4_avx512` does for Q4_1), 5- and 6-bit values
/// are assembled in integer lanes and converted (Q5_K, Q6_K); float activations.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_k_avx512(format: Format, qs: &[u8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (kq, kd) = (format.kq_bytes(), format.kd_len());
    let nb = qs.len() / kq;
    debug_assert!(x.len() >= nb * 256 && d.len() == nb * kd);
    let iota = q4_iota::<true>();
    let mut acc = [_mm512_setzero_ps(); 4];
    // SAFETY: super-block `b` reads its `kq` bytes at `kq·b`, `kd` scales at `kd·b` and 256
    // floats at `256·b`, inside the slices (the row holds `nb` whole blocks, checked at load;
    // `x` at least as many values); unaligned loads.
    unsafe {
        for b in 0..nb {
            let q = qs.as_ptr().add(kq * b);
            let xp = x.as_ptr().add(256 * b);
            _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(PREFETCH_BYTES) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(PREFETCH_BYTES + 64) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(PREFETCH_BYTES + 128) as *const i8);
            match format {
                Format::Q4K | Format::Q5K => {
                    let bytes8 = |p: *const u8| {
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            p as *const __m128i,
                        )))
                    };
                    let (mut ds, mut ms) = ([0f32; 8], [0f32; 8]);
                    _mm256_storeu_ps(
                        ds.as_mut_ptr(),
                        _mm256_mul_ps(_mm256_set1_ps(*d.get_unchecked(kd * b)), bytes8(q)),
                    );
                    _mm256_storeu_ps(
                        ms.as_mut_ptr(),
                        _mm256_mul_ps(
                            _mm256_set1_ps(*d.get_unchecked(kd * b + 1)),
                            bytes8(q.add(8)),
                        ),
                    );
                    let five = format == Format::Q5K;
                    let ql = if five { q.add(48) } else { q.add(16) };
                    let qh = if five {
                        [
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(q.add(16) as *const __m128i)),
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(q.add(32) as *const __m128i)),
                        ]
                    } else {
                        [_mm512_setzero_si512(); 2]
                    };
                    for j in 0..4 {
                        // 64 values: 32 bytes, low nibbles sub-block 2j, high ones 2j+1.
                        let qj = ql.add(32 * j);
                        let lanes = [
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(qj as *const __m128i)),
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(qj.add(16) as *const __m128i)),
                        ];
                        let (d1, m1) = (_mm512_set1_ps(ds[2 * j]), _mm512_set1_ps(ms[2 * j]));
                        let (d2, m2) =
                            (_mm512_set1_ps(ds[2 * j + 1]), _mm512_set1_ps(ms[2 * j + 1]));
                        let xj = xp.add(64 * j);
                        for h in 0..2 {
                            let (w_lo, w_hi) = if five {
                                let nib = _mm512_set1_epi32(0xF);
                                let one = _mm512_set1_epi32(1);
                                let hi = _mm512_srlv_epi32(qh[h], _mm512_set1_epi32(2 * j as i32));
                                let lo_q = _mm512_or_si512(
                                    _mm512_and_si512(lanes[h], nib),
                                    _mm512_slli_epi32(_mm512_and_si512(hi, one), 4),
                                );
                                let hi_q = _mm512_or_si512(
                                    _mm512_srli_epi32(lanes[h], 4),
                                    _mm512_slli_epi32(
                                        _mm512_and_si512(_mm512_srli_epi32(hi, 1), one),
                                        4,
                                    ),
                                );
                                (
                                    _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo_q), d1), m1),
                                    _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi_q), d2), m2),
                                )
                            } else {
                                // `d·q − m` rounded twice, as ggml's de-quantisation does;
                                // `permutexvar` reads the low 4 bits of each lane.
                                let t1 = _mm512_sub_ps(_mm512_mul_ps(iota, d1), m1);
                                let t2 = _mm512_sub_ps(_mm512_mul_ps(iota, d2), m2);
                                (
                                    _mm512_permutexvar_ps(lanes[h], t1),
                                    _mm512_permutexvar_ps(_mm512_srli_epi32(lanes[h], 4), t2),
                                )
                            };
                            acc[h] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(xj.add(16 * h)), acc[h]);
                            acc[2 + h] = _mm512_fmadd_ps(
                                w_hi,
                                _mm512_loadu_ps(xj.add(32 + 16 * h)),
                                acc[2 + h],
                            );
                        }
                    }
                }
                Format::Q6K => {
                    let mut sc = [0f32; 16];
                    _mm512_storeu_ps(
                        sc.as_mut_ptr(),
                        _mm512_mul_ps(
                            _mm512_set1_ps(*d.get_unchecked(b)),
                            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                q.add(192) as *const __m128i
                            ))),
                        ),
                    );
                    let low4 = _mm512_set1_epi32(0xF);
                    let two = _mm512_set1_epi32(3);
                    let off = _mm512_set1_epi32(32);
                    for n in 0..2 {
                        let ql = q.add(64 * n);
                        let qh = q.add(128 + 32 * n);
                        let yn = xp.add(128 * n);
                        for g in 0..2 {
                            // Lanes l = 16·g … 16·g + 15 of the four 32-value quarters.
                            let l0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                                ql.add(16 * g) as *const __m128i
                            ));
                            let l1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                                ql.add(32 + 16 * g) as *const __m128i
                            ));
                            let h = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                                qh.add(16 * g) as *const __m128i
                            ));
                            let bits = |shift: i32| -> __m512i {
                                _mm512_slli_epi32(
                                    _mm512_and_si512(
                                        _mm512_srlv_epi32(h, _mm512_set1_epi32(shift)),
                                        two,
                                    ),
                                    4,
                                )
                            };
                            let qv = [
                                _mm512_or_si512(_mm512_and_si512(l0, low4), bits(0)),
                                _mm512_or_si512(_mm512_and_si512(l1, low4), bits(2)),
                                _mm512_or_si512(_mm512_srli_epi32(l0, 4), bits(4)),
                                _mm512_or_si512(_mm512_srli_epi32(l1, 4), bits(6)),
                            ];
                            for (k, qk) in qv.into_iter().enumerate() {
                                let w = _mm512_mul_ps(
                                    _mm512_set1_ps(sc[8 * n + g + 2 * k]),
                                    _mm512_cvtepi32_ps(_mm512_sub_epi32(qk, off)),
                                );
                                acc[k] = _mm512_fmadd_ps(
                                    w,
                                    _mm512_loadu_ps(yn.add(32 * k + 16 * g)),
                                    acc[k],
                                );
                            }
                        }
                    }
                }
                _ => unreachable!("not a K-quant"),
            }
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(acc[0], acc[1]),
        _mm512_add_ps(acc[2], acc[3]),
    ))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_k_avx2(format: Format, qs: &[u8], d: &[f32], x: &[f32]) -> f32 {
    // SAFETY: the caller checked AVX2 and FMA.
    dot_k_with(format, qs, d, x, |a, b| unsafe { dot_f32_avx2(a, b) })
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
        // Ahead of the hardware prefetcher, as in `dot4_q4_avx512` (past the end never faults).
        _mm_prefetch::<_MM_HINT_T0>(q.as_ptr().wrapping_add(2 * PREFETCH_BYTES) as *const i8);
        if b % 16 == 0 {
            let ahead = d.as_ptr().wrapping_add(b + PREFETCH_BYTES / 8);
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
        }
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
        if b % 4 == 0 {
            // Ahead of the hardware prefetcher, as in `dot4_q4_avx512`.
            _mm_prefetch::<_MM_HINT_T0>(q.as_ptr().wrapping_add(PREFETCH_BYTES) as *const i8);
        }
        if b % 16 == 0 {
            let ahead = d.as_ptr().wrapping_add(b + PREFETCH_BYTES / 4);
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
        }
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

/// `out[p][j] = w_j · x_p` for up to 4 dense rows `w` (`n_w × k`) and up to 3 positions `x`
/// (`n_x × k`).
fn dots_block(w: &[f32], x: &[f32], k: usize, out: &mut [[f32; 4]; 4], simd: Simd) {
    let (nw, nx) = (w.len() / k, x.len() / k);
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 && nw == 4 && (1..=4).contains(&nx) && k.is_multiple_of(16) {
        // SAFETY: AVX-512F was detected at run time; 4 rows and `nx` positions of `k` values.
        match nx {
            4 => unsafe { dots_4xp_avx512::<4>(w, x, k, out) },
            3 => unsafe { dots_4xp_avx512::<3>(w, x, k, out) },
            2 => unsafe { dots_4xp_avx512::<2>(w, x, k, out) },
            _ => unsafe { dots_4xp_avx512::<1>(w, x, k, out) },
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx2 && nw == 4 && k.is_multiple_of(8) {
        // SAFETY: AVX2 and FMA were detected at run time; 4 rows and `nx` positions of `k`.
        match nx {
            4 => {
                let mut rest = [[0f32; 4]; 4];
                unsafe { dots_4xp_avx2::<3>(w, &x[..3 * k], k, out) };
                unsafe { dots_4xp_avx2::<1>(w, &x[3 * k..], k, &mut rest) };
                out[3] = rest[0];
            }
            3 => unsafe { dots_4xp_avx2::<3>(w, x, k, out) },
            2 => unsafe { dots_4xp_avx2::<2>(w, x, k, out) },
            _ => unsafe { dots_4xp_avx2::<1>(w, x, k, out) },
        }
        return;
    }
    for (p, xr) in x.chunks_exact(k).enumerate() {
        for (j, wr) in w.chunks_exact(k).enumerate() {
            out[p][j] = dot_f32(wr, xr, simd);
        }
    }
}

/// [`Row::dequantize`] of Q8_0, Q4_0 and Q4_1 blocks, 16 values per instruction (the several-
/// positions matmul expands every weight row once per step: on the scalar loop that was most
/// of a batched decode step's time). The same arithmetic as the scalar loop (`d·q`, then
/// `+ m`: two roundings), so the values are identical.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dequant_blocks_avx512(format: Format, qs: &[u8], d: &[f32], m: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = out.len() / 32;
    // SAFETY: the caller checked that `qs`, `d` (and `m` for Q4_1) hold `nb` blocks; every
    // load and store stays inside block `b` of them and of `out`.
    unsafe {
        let mask = _mm_set1_epi8(0x0F);
        for b in 0..nb {
            let dv = _mm512_set1_ps(d[b]);
            let o = out.as_mut_ptr().add(b * 32);
            if format == Format::Q8_0 {
                let q = qs.as_ptr().add(b * 32);
                let lo = _mm_loadu_si128(q as *const __m128i);
                let hi = _mm_loadu_si128(q.add(16) as *const __m128i);
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
                _mm512_storeu_ps(o, _mm512_mul_ps(dv, lo));
                _mm512_storeu_ps(o.add(16), _mm512_mul_ps(dv, hi));
            } else {
                let off = if format == Format::Q4_0 {
                    -8.0 * d[b]
                } else {
                    m[b]
                };
                let mv = _mm512_set1_ps(off);
                let q = _mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
                _mm512_storeu_ps(o, _mm512_add_ps(_mm512_mul_ps(dv, lo), mv));
                _mm512_storeu_ps(o.add(16), _mm512_add_ps(_mm512_mul_ps(dv, hi), mv));
            }
        }
    }
}

/// [`dots_block`] for 4 rows × `P` positions (`P` ≤ 4): 4·P accumulators, 4 + P loads per
/// 4·P FMAs (at P = 4 the FMAs, not the loads, set the pace).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_4xp_avx512<const P: usize>(w: &[f32], x: &[f32], k: usize, out: &mut [[f32; 4]; 4]) {
    use std::arch::x86_64::*;
    debug_assert!(P <= 4 && w.len() == 4 * k && x.len() == P * k);
    let mut acc = [[_mm512_setzero_ps(); 4]; P];
    // SAFETY: every load reads 16 floats at `c < k` of a row inside `w` or `x`.
    unsafe {
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut c = 0;
        while c < k {
            let mut xs = [_mm512_setzero_ps(); P];
            for (p, v) in xs.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(xp.add(p * k + c));
            }
            for j in 0..4 {
                let wv = _mm512_loadu_ps(wp.add(j * k + c));
                for (a, xv) in acc.iter_mut().zip(&xs) {
                    a[j] = _mm512_fmadd_ps(wv, *xv, a[j]);
                }
            }
            c += 16;
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        for (o, a) in o.iter_mut().zip(a) {
            *o = _mm512_reduce_add_ps(*a);
        }
    }
}

/// [`dots_4xp_avx512`] for `P` ≤ 3 with 8 floats per instruction: 4·P
/// accumulators, 4 + P loads per 4·P FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_4xp_avx2<const P: usize>(w: &[f32], x: &[f32], k: usize, out: &mut [[f32; 4]; 4]) {
    use std::arch::x86_64::*;
    debug_assert!(P <= 3 && w.len() == 4 * k && x.len() == P * k);
    let mut acc = [[_mm256_setzero_ps(); 4]; P];
    // SAFETY: every load reads 8 floats at `c < k` of a row inside `w` or `x`.
    unsafe {
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut c = 0;
        while c < k {
            let mut xs = [_mm256_setzero_ps(); P];
            for (p, v) in xs.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(xp.add(p * k + c));
            }
            for j in 0..4 {
                let wv = _mm256_loadu_ps(wp.add(j * k + c));
                for (a, xv) in acc.iter_mut().zip(&xs) {
                    a[j] = _mm256_fmadd_ps(wv, *xv, a[j]);
                }
            }
            c += 8;
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            for (o, a) in o.iter_mut().zip(a) {
                *o = hsum(*a);
            }
        }
    }
}

/// [`dequant_blocks_avx512`] with 8 values per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequant_blocks_avx2(format: Format, qs: &[u8], d: &[f32], m: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = out.len() / 32;
    let f8 = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    let u8f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    // SAFETY: the caller checked that `qs`, `d` (and `m` for Q4_1) hold `nb` blocks; every
    // load and store stays inside block `b` of them and of `out`.
    unsafe {
        let mask = _mm_set1_epi8(0x0F);
        for b in 0..nb {
            let dv = _mm256_set1_ps(d[b]);
            let o = out.as_mut_ptr().add(b * 32);
            if format == Format::Q8_0 {
                let q = qs.as_ptr().add(b * 32);
                let lo = _mm_loadu_si128(q as *const __m128i);
                let hi = _mm_loadu_si128(q.add(16) as *const __m128i);
                let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                for (i, v) in parts.into_iter().enumerate() {
                    _mm256_storeu_ps(o.add(8 * i), _mm256_mul_ps(dv, f8(v)));
                }
            } else {
                let off = if format == Format::Q4_0 {
                    -8.0 * d[b]
                } else {
                    m[b]
                };
                let mv = _mm256_set1_ps(off);
                let q = _mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                for (i, v) in parts.into_iter().enumerate() {
                    // Multiply, then add (not fused): the scalar loop's two roundings.
                    let y = _mm256_add_ps(_mm256_mul_ps(dv, u8f(v)), mv);
                    _mm256_storeu_ps(o.add(8 * i), y);
                }
            }
        }
    }
}

/// `y += s·x`.
pub(crate) fn axpy(s: f32, x: &[f32], y: &mut [f32], simd: Simd) {
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

/// `o_p[at..at + n] += Σ_j s(p, j) · b_j[off..off + n]` over the ranks `b`, for the `P`
/// outputs `outs` (see `LowRank::add_rows`): 64 rows per pass, four accumulators per
/// position, the ranks' terms summed in registers and each tile of `b_j` loaded once for all
/// the positions; each output read and written once.
///
/// # Safety
/// AVX-512F must be available, every `b_j` must hold `off + n` values and every `outs[p]`
/// `at + n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn low_rank_rows_avx512<const P: usize>(
    s: &impl Fn(usize, usize) -> f32,
    b: &[(usize, Vec<f32>)],
    off: usize,
    outs: &[*mut f32],
    at: usize,
    n: usize,
) {
    use std::arch::x86_64::*;
    assert_eq!(outs.len(), P, "one output per position");
    let mut t = 0;
    // SAFETY: every load and store touches values below `n` past `at` of each output and
    // below `off + n` of each `b_j` (the caller's promise); the tail is masked.
    unsafe {
        while t + 64 <= n {
            let mut acc = [[_mm512_setzero_ps(); 4]; P];
            for (j, (_, bj)) in b.iter().enumerate() {
                let p = bj.as_ptr().add(off + t);
                let w = [
                    _mm512_loadu_ps(p),
                    _mm512_loadu_ps(p.add(16)),
                    _mm512_loadu_ps(p.add(32)),
                    _mm512_loadu_ps(p.add(48)),
                ];
                for (pos, acc) in acc.iter_mut().enumerate() {
                    let sv = _mm512_set1_ps(s(pos, j));
                    for (a, w) in acc.iter_mut().zip(&w) {
                        *a = _mm512_fmadd_ps(sv, *w, *a);
                    }
                }
            }
            for (acc, &o) in acc.iter().zip(outs) {
                let op = o.add(at + t);
                for (q, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(
                        op.add(16 * q),
                        _mm512_add_ps(_mm512_loadu_ps(op.add(16 * q)), *a),
                    );
                }
            }
            t += 64;
        }
        while t < n {
            let left = (n - t).min(16);
            let mask = tail_mask(left);
            let mut acc = [_mm512_setzero_ps(); P];
            for (j, (_, bj)) in b.iter().enumerate() {
                let w = _mm512_maskz_loadu_ps(mask, bj.as_ptr().add(off + t));
                for (pos, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(s(pos, j)), w, *a);
                }
            }
            for (a, &o) in acc.iter().zip(outs) {
                let op = o.add(at + t);
                _mm512_mask_storeu_ps(op, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, op), *a));
            }
            t += left;
        }
    }
}

/// The mask of the first `left` lanes of sixteen (`left` ≤ 16).
#[cfg(target_arch = "x86_64")]
pub(crate) fn tail_mask(left: usize) -> std::arch::x86_64::__mmask16 {
    if left >= 16 {
        0xffff
    } else {
        (1u16 << left) - 1
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

/// How far ahead of the block being read the quantised kernels prefetch.
const PREFETCH_BYTES: usize = 4096;

/// `Σ_b Σ_j (d_b·q_bj + m_b) · x_bj` for 4-bit quants, 16 floats per instruction. Each block's
/// 16 possible weight values `d·q + m` are one register, and the quants index it (`vpermps`
/// reads the low 4 bits of each lane), so no integer-to-float conversion is needed.
/// `OFFSETS`: `m` holds each block's offset (Q4_1); without, the offset is `−8·d` (Q4_0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_q4_avx512<const OFFSETS: bool>(qs: &[u8], d: &[f32], m: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = d.len();
    debug_assert!(qs.len() == nb * 16 && (!OFFSETS || m.len() == nb) && x.len() >= nb * 32);
    let iota = q4_iota::<OFFSETS>();
    let mut acc = [_mm512_setzero_ps(); 4];
    // SAFETY: block `b` reads 16 bytes of quants at 16·b and 32 floats at 32·b, inside the
    // slices (lengths checked at load); unaligned loads.
    unsafe {
        let block = |b: usize| {
            let lanes =
                _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.as_ptr().add(16 * b) as *const __m128i));
            let table = if OFFSETS {
                _mm512_fmadd_ps(
                    iota,
                    _mm512_set1_ps(*d.get_unchecked(b)),
                    _mm512_set1_ps(*m.get_unchecked(b)),
                )
            } else {
                _mm512_mul_ps(iota, _mm512_set1_ps(*d.get_unchecked(b)))
            };
            let xp = x.as_ptr().add(32 * b);
            (
                _mm512_permutexvar_ps(lanes, table),
                _mm512_loadu_ps(xp),
                _mm512_permutexvar_ps(_mm512_srli_epi32(lanes, 4), table),
                _mm512_loadu_ps(xp.add(16)),
            )
        };
        let mut b = 0;
        // Two blocks a turn into four accumulators, so the FMAs do not wait on each other.
        while b + 2 <= nb {
            // The hardware prefetcher alone leaves the loop waiting on memory: ask for the
            // quants and scales a little ahead (past the row's end is harmless: the next
            // row follows).
            let qa = qs.as_ptr().wrapping_add(16 * b + PREFETCH_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(qa as *const i8);
            if b % 8 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(
                    d.as_ptr().wrapping_add(b + PREFETCH_BYTES / 4) as *const i8
                );
                if OFFSETS {
                    _mm_prefetch::<_MM_HINT_T0>(
                        m.as_ptr().wrapping_add(b + PREFETCH_BYTES / 4) as *const i8
                    );
                }
            }
            let (w0, x0, w1, x1) = block(b);
            acc[0] = _mm512_fmadd_ps(w0, x0, acc[0]);
            acc[1] = _mm512_fmadd_ps(w1, x1, acc[1]);
            let (w0, x0, w1, x1) = block(b + 1);
            acc[2] = _mm512_fmadd_ps(w0, x0, acc[2]);
            acc[3] = _mm512_fmadd_ps(w1, x1, acc[3]);
            b += 2;
        }
        if b < nb {
            let (w0, x0, w1, x1) = block(b);
            acc[0] = _mm512_fmadd_ps(w0, x0, acc[0]);
            acc[1] = _mm512_fmadd_ps(w1, x1, acc[1]);
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(acc[0], acc[1]),
        _mm512_add_ps(acc[2], acc[3]),
    ))
}

/// The 16 quant values a 4-bit block's table is made from: `0..16`, or `−8..8` when the
/// offset is `−8·d` (Q4_0: the table is then `d·(q − 8)`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn q4_iota<const OFFSETS: bool>() -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let o = if OFFSETS { 0.0 } else { -8.0 };
    _mm512_setr_ps(
        o,
        o + 1.0,
        o + 2.0,
        o + 3.0,
        o + 4.0,
        o + 5.0,
        o + 6.0,
        o + 7.0,
        o + 8.0,
        o + 9.0,
        o + 10.0,
        o + 11.0,
        o + 12.0,
        o + 13.0,
        o + 14.0,
        o + 15.0,
    )
}

/// [`dot_q4_avx512`] for 4 consecutive rows (`qs`, `d`, and with `OFFSETS` `m`, hold 4 rows
/// of `nb` blocks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot4_q4_avx512<const OFFSETS: bool>(
    qs: &[u8],
    d: &[f32],
    m: &[f32],
    nb: usize,
    x: &[f32],
) -> [f32; 4] {
    use std::arch::x86_64::*;
    debug_assert!(qs.len() == 4 * nb * 16 && d.len() == 4 * nb && (!OFFSETS || m.len() == 4 * nb));
    debug_assert!(x.len() >= nb * 32);
    let iota = q4_iota::<OFFSETS>();
    let mut lo = [_mm512_setzero_ps(); 4];
    let mut hi = [_mm512_setzero_ps(); 4];
    // SAFETY: row j's block b reads 16 bytes at (j·nb + b)·16 and one float at j·nb + b, all
    // inside the slices; x reads 32 floats at 32·b < 32·nb. Prefetches may point past the
    // end (they never fault).
    unsafe {
        let (qp, dp, mp, xp) = (qs.as_ptr(), d.as_ptr(), m.as_ptr(), x.as_ptr());
        for b in 0..nb {
            // The 4 rows are read side by side, 64 bytes of quants and 16 of each scale a
            // block: prefetch the same amounts, further on in the same (contiguous) order.
            _mm_prefetch::<_MM_HINT_T0>(qp.wrapping_add(64 * b + PREFETCH_BYTES) as *const i8);
            if b % 4 == 0 {
                let ahead = 16 * b + PREFETCH_BYTES / 4;
                _mm_prefetch::<_MM_HINT_T0>((dp as *const u8).wrapping_add(ahead) as *const i8);
                if OFFSETS {
                    _mm_prefetch::<_MM_HINT_T0>((mp as *const u8).wrapping_add(ahead) as *const i8);
                }
            }
            let x0 = _mm512_loadu_ps(xp.add(32 * b));
            let x1 = _mm512_loadu_ps(xp.add(32 * b + 16));
            for j in 0..4 {
                let at = j * nb + b;
                let lanes =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(16 * at) as *const __m128i));
                let table = if OFFSETS {
                    _mm512_fmadd_ps(
                        iota,
                        _mm512_set1_ps(*dp.add(at)),
                        _mm512_set1_ps(*mp.add(at)),
                    )
                } else {
                    _mm512_mul_ps(iota, _mm512_set1_ps(*dp.add(at)))
                };
                lo[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lanes, table), x0, lo[j]);
                hi[j] = _mm512_fmadd_ps(
                    _mm512_permutexvar_ps(_mm512_srli_epi32(lanes, 4), table),
                    x1,
                    hi[j],
                );
            }
        }
    }
    std::array::from_fn(|j| _mm512_reduce_add_ps(_mm512_add_ps(lo[j], hi[j])))
}

/// [`dot_q8_0_avx512`] for 4 consecutive rows (`qs`, `d` hold 4 rows of `nb` blocks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot4_q8_0_avx512(qs: &[u8], d: &[f32], nb: usize, x: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    debug_assert!(qs.len() == 4 * nb * 32 && d.len() == 4 * nb && x.len() >= nb * 32);
    let f = |v: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
    let mut acc = [_mm512_setzero_ps(); 4];
    // SAFETY: as in `dot4_q4_avx512`, with 32 bytes of quants a block.
    unsafe {
        let (qp, dp, xp) = (qs.as_ptr(), d.as_ptr(), x.as_ptr());
        for b in 0..nb {
            let ahead = qp.wrapping_add(128 * b + 2 * PREFETCH_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64) as *const i8);
            if b % 4 == 0 {
                let ahead = (dp as *const u8).wrapping_add(16 * b + PREFETCH_BYTES / 4);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            }
            let x0 = _mm512_loadu_ps(xp.add(32 * b));
            let x1 = _mm512_loadu_ps(xp.add(32 * b + 16));
            for (j, acc) in acc.iter_mut().enumerate() {
                let at = j * nb + b;
                let q = qp.add(32 * at) as *const __m128i;
                let p = _mm512_fmadd_ps(
                    f(_mm_loadu_si128(q.add(1))),
                    x1,
                    _mm512_mul_ps(f(_mm_loadu_si128(q)), x0),
                );
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*dp.add(at)), p, *acc);
            }
        }
    }
    std::array::from_fn(|j| _mm512_reduce_add_ps(acc[j]))
}

/// [`dot_q8_0_avx2`] with 16 floats per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_q8_0_avx512(qs: &[u8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = d.len();
    debug_assert!(qs.len() == nb * 32 && x.len() >= nb * 32);
    let f = |v: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    // SAFETY: block `b` reads 32 bytes of quants and 32 floats at 32·b, inside the slices
    // (lengths checked at load); unaligned loads.
    unsafe {
        // (d, Σ_j q_j·x_j) of one block.
        let block = |b: usize| {
            let qp = qs.as_ptr().add(32 * b) as *const __m128i;
            let xp = x.as_ptr().add(32 * b);
            let p = _mm512_fmadd_ps(
                f(_mm_loadu_si128(qp.add(1))),
                _mm512_loadu_ps(xp.add(16)),
                _mm512_mul_ps(f(_mm_loadu_si128(qp)), _mm512_loadu_ps(xp)),
            );
            (_mm512_set1_ps(*d.get_unchecked(b)), p)
        };
        let mut b = 0;
        while b + 2 <= nb {
            // As in `dot_q4_avx512`.
            let qa = qs.as_ptr().wrapping_add(32 * b + 2 * PREFETCH_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(qa as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(qa.wrapping_add(64) as *const i8);
            if b % 8 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(
                    d.as_ptr().wrapping_add(b + PREFETCH_BYTES / 8) as *const i8
                );
            }
            let (dv, p) = block(b);
            acc0 = _mm512_fmadd_ps(dv, p, acc0);
            let (dv, p) = block(b + 1);
            acc1 = _mm512_fmadd_ps(dv, p, acc1);
            b += 2;
        }
        if b < nb {
            let (dv, p) = block(b);
            acc0 = _mm512_fmadd_ps(dv, p, acc0);
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
        // Big enough for the parallel pass (several work items, rank spans crossing them).
        let (rows, cols) = (517, 128);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let mat = QuantMatrix::from_bytes(Format::Q4_1, &q.data().unwrap(), rows, cols).unwrap();
        let wd = q.dequantize(&Device::Cpu).unwrap();
        // The rows' squared norms (a DoRA's gains need them) are the de-quantised rows'.
        let want: Vec<f32> = wd.sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
        for (g, w) in mat.row_norms_sq().iter().zip(&want) {
            assert!((g - w).abs() < 1e-4 * w, "{g} vs {w}");
        }
        // Two adapters. Ranks touch blocks of rows (a fused projection's), several ranks the
        // same block (one projection's), blocks overlapping, crossing work items, reaching the
        // last row.
        let spans: [(usize, usize); 7] = [
            (0, 300),
            (0, 300),
            (0, 300),
            (200, 317),
            (200, 317),
            (100, 250),
            (100, 250),
        ];
        let adapter = |ranks: usize| {
            let a = Tensor::randn(0f32, 1.0, (ranks, cols), &Device::Cpu).unwrap();
            let bv: Vec<(usize, Vec<f32>)> = spans[..ranks]
                .iter()
                .map(|&(first, len)| {
                    let t = Tensor::randn(0f32, 1.0, len, &Device::Cpu).unwrap();
                    (first, t.to_vec1().unwrap())
                })
                .collect();
            let mut dense_b = vec![0f32; ranks * rows];
            for (j, (first, vals)) in bv.iter().enumerate() {
                dense_b[j * rows + first..j * rows + first + vals.len()].copy_from_slice(vals);
            }
            let b = Tensor::from_vec(dense_b, (ranks, rows), &Device::Cpu).unwrap();
            let av: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            (a, av, b, bv)
        };
        let adapters = [adapter(7), adapter(3)];
        let wflat: Vec<f32> = wd.flatten_all().unwrap().to_vec1().unwrap();
        for m in [1, 2, 5, 13] {
            let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            // Position i: the first adapter, the second, none, in turn (13: five positions
            // on the first, more than one pass over `B` takes at once).
            let pick = |i: usize| adapters.get(i % 3);
            let mut want: Vec<f32> = Vec::new();
            for (i, xr) in xs.chunks_exact(cols).enumerate() {
                let xt = Tensor::from_slice(xr, (1, cols), &Device::Cpu).unwrap();
                let mut row: Vec<f32> = if mat.packed().is_some() {
                    // The integer kernels quantise the activations of the base product (not
                    // the term's).
                    vnni::reference(&wflat, xr)
                } else {
                    xt.matmul(&wd.t().unwrap())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                if let Some((a, _, b, _)) = pick(i) {
                    let term: Vec<f32> = xt
                        .matmul(&a.t().unwrap())
                        .unwrap()
                        .matmul(b)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    for (r, t) in row.iter_mut().zip(term) {
                        *r += t;
                    }
                }
                want.extend(row);
            }
            let lows: Vec<Option<LowRank<'_>>> = (0..m)
                .map(|i| {
                    pick(i).map(|(_, av, _, bv)| LowRank {
                        a: av,
                        b: bv,
                        gains: None,
                    })
                })
                .collect();
            let mut out = vec![0f32; m * rows];
            mat.matmul_rows(&xs, &mut out, &lows);
            for (g, w) in out.iter().zip(&want) {
                assert!((g - w).abs() < 1e-3 * (1.0 + w.abs()), "m {m}: {g} vs {w}");
            }
            // The plain reference of the term agrees.
            for (i, low) in lows.iter().enumerate() {
                let Some(low) = low else { continue };
                let xr = &xs[i * cols..(i + 1) * cols];
                let mut term = vec![0f32; rows];
                low.add_to(xr, &mut term);
                let mut base = vec![0f32; rows];
                mat.matmul_rows(xr, &mut base, &[]);
                for ((g, t), b) in out[i * rows..(i + 1) * rows].iter().zip(&term).zip(&base) {
                    assert!(
                        (g - (b + t)).abs() < 1e-3 * (1.0 + g.abs()),
                        "{g} vs {b} + {t}"
                    );
                }
            }
            // A DoRA's gains scale each output row, base and term together.
            let gains: Vec<f32> = (0..rows).map(|r| 0.5 + (r % 7) as f32 * 0.25).collect();
            let glows: Vec<Option<LowRank<'_>>> = lows
                .iter()
                .map(|l| {
                    l.map(|l| LowRank {
                        gains: Some(&gains),
                        ..l
                    })
                })
                .collect();
            let mut scaled = vec![0f32; m * rows];
            mat.matmul_rows(&xs, &mut scaled, &glows);
            for (i, (g, w)) in scaled.iter().zip(&want).enumerate() {
                let w = if lows[i / rows].is_some() {
                    w * gains[i % rows]
                } else {
                    *w
                };
                assert!((g - w).abs() < 1e-3 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn blocked_dots_match_plain_dots_at_every_level() {
        let k = 96;
        let w: Vec<f32> = (0..4 * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let x: Vec<f32> = (0..4 * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
            .collect();
        for level in levels() {
            for (nw, nx) in [(4, 4), (4, 3), (4, 2), (3, 4), (3, 2), (4, 1), (1, 1)] {
                let mut out = [[0f32; 4]; 4];
                dots_block(&w[..nw * k], &x[..nx * k], k, &mut out, level);
                for p in 0..nx {
                    for j in 0..nw {
                        let want: f32 = w[j * k..(j + 1) * k]
                            .iter()
                            .zip(&x[p * k..(p + 1) * k])
                            .map(|(a, b)| a * b)
                            .sum();
                        let got = out[p][j];
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{level:?} {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_path_computes_the_dequantised_product() {
        for (dtype, format) in [
            (GgmlDType::Q4_0, Format::Q4_0),
            (GgmlDType::Q4_1, Format::Q4_1),
            (GgmlDType::Q8_0, Format::Q8_0),
            (GgmlDType::Q4K, Format::Q4K),
            (GgmlDType::Q5K, Format::Q5K),
            (GgmlDType::Q6K, Format::Q6K),
        ] {
            for m in [1, 3, 5] {
                let (rows, cols) = (37, if format.is_k() { 512 } else { 96 });
                let nb = cols / 32;
                let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let mat = QuantMatrix::from_bytes(format, &q.data().unwrap(), rows, cols).unwrap();
                // Back to GGUF blocks (moving to candle's kernels, a GPU) loses nothing.
                assert_eq!(
                    mat.ggml_bytes().unwrap(),
                    q.data().unwrap().to_vec(),
                    "{format:?}"
                );
                assert_eq!(format.ggml(), Some(dtype));
                assert_eq!(Format::from_ggml(dtype), Some(format));
                let wd = q.dequantize(&Device::Cpu).unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap();
                let exact: Vec<Vec<f32>> = x.matmul(&wd.t().unwrap()).unwrap().to_vec2().unwrap();
                let wrows: Vec<Vec<f32>> = wd.to_vec2().unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let mut out = vec![0f32; m * rows];
                mat.matmul(&xs, &mut out, None);
                let sums: Vec<f32> = xs.chunks_exact(32).map(|c| c.iter().sum()).collect();
                let wflat: Vec<f32> = wrows.concat();
                for i in 0..m {
                    // Where the integer kernels run (VNNI), the activations are quantised too:
                    // `vnni`'s reference computes that product.
                    let int8 = mat
                        .packed()
                        .map(|_| vnni::reference(&wflat, &xs[i * cols..(i + 1) * cols]));
                    for r in 0..rows {
                        let want = exact[i][r];
                        let tol = 1e-4 * (1.0 + want.abs());
                        let got = out[i * rows + r];
                        let expect = int8.as_ref().map_or(want, |v| v[r]);
                        assert!(
                            (got - expect).abs() < 1e-4 * (1.0 + expect.abs()),
                            "{format:?} {i},{r}: {got} vs {expect}"
                        );
                        // The portable paths, and every vector level this processor has,
                        // agree too.
                        let xr = &xs[i * cols..(i + 1) * cols];
                        let row_sums = &sums[i * nb..(i + 1) * nb];
                        for level in levels() {
                            let v = mat.row(r).dot(xr, row_sums, level);
                            assert!((v - want).abs() < tol, "{format:?} {level:?} {v} vs {want}");
                        }
                        let s = mat.row(r).dot_scalar(xr, row_sums);
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

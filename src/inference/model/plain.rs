//! The plain forward path: every matmul on the engine's own kernels (with the LoRA term
//! inside the parallel pass) and the rest on `ops`, over plain slices — no candle tensor
//! between them.

use super::*;

/// What the engine's own layer loop reads besides the matmul weights, as plain slices.
pub(super) struct Plain {
    pub(super) layers: Vec<PlainLayer>,
    pub(super) norm: Vec<f32>,
    /// `max_positions × head_dim/2` each.
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
}

pub(super) struct PlainLayer {
    pub(super) input_norm: Vec<f32>,
    pub(super) post_norm: Vec<f32>,
    pub(super) q_norm: Option<Vec<f32>>,
    pub(super) k_norm: Option<Vec<f32>>,
    pub(super) qkv_bias: Option<Vec<f32>>,
}

pub(super) fn own(l: &Linear) -> anyhow::Result<&QuantMatrix> {
    match &l.w {
        Weight::Own(m) => Ok(m),
        Weight::Candle(_) => bail!("a weight is not on the engine's kernels"),
    }
}

pub(super) fn plain_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

impl Plain {
    /// `None` unless every matmul weight of `m` runs on the engine's own kernels.
    pub(super) fn new(m: &Model) -> anyhow::Result<Option<Plain>> {
        let own = |l: &Linear| matches!(l.w, Weight::Own(_));
        if !m.device.is_cpu()
            || !m.layers.iter().all(|l| {
                own(&l.qkv)
                    && own(&l.o)
                    && own(&l.gate_up)
                    && own(&l.down)
                    && l.o.b.is_none()
                    && l.gate_up.b.is_none()
                    && l.down.b.is_none()
            })
        {
            return Ok(None);
        }
        let opt = |t: &Option<Tensor>| t.as_ref().map(plain_vec).transpose();
        let layers = m
            .layers
            .iter()
            .map(|l| {
                Ok(PlainLayer {
                    input_norm: plain_vec(&l.input_norm)?,
                    post_norm: plain_vec(&l.post_norm)?,
                    q_norm: opt(&l.q_norm)?,
                    k_norm: opt(&l.k_norm)?,
                    qkv_bias: opt(&l.qkv.b)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Plain {
            layers,
            norm: plain_vec(&m.norm)?,
            cos: plain_vec(&m.cos)?,
            sin: plain_vec(&m.sin)?,
        }))
    }
}

impl Model {
    /// [`Model::forward_batch`] on plain slices: the engine's kernels for every matmul (with
    /// each row's LoRA term inside) and the `ops` functions for the rest, with no candle
    /// tensor between them. Computes what the tensor path computes (the same operations in the
    /// same order, up to float summation order).
    ///
    /// The rows of every item are stacked into one activation matrix: each matmul reads its
    /// weights once for the whole batch (decoding is bound by reading the weights, so a step
    /// of 8 sequences costs little more than a step of one); rope, the cache writes and
    /// attention run per item, at its own positions, over its own cache.
    pub(super) fn forward_plain(
        &self,
        plain: &Plain,
        items: &mut [BatchItem<'_>],
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        use crate::inference::ops;
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let s: usize = items.iter().map(|it| it.tokens.len()).sum();
        let (hidden, nh, nkv, hd) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
        let [qs, ks, _] = c.qkv_sizes();
        let n_qkv = qs + 2 * ks;
        let inter = c.intermediate_size;
        let half = hd / 2;
        let tokens: Vec<u32> = items
            .iter()
            .flat_map(|it| it.tokens.iter().copied())
            .collect();
        let mut x = match &self.embed {
            Embedding::Own(m) => m.rows_f32(&tokens)?,
            other => other
                .lookup(&tokens, &self.device)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        };
        // Per row: its item, and its position in that item's sequence.
        let mut row_item = Vec::with_capacity(s);
        let mut row_pos = Vec::with_capacity(s);
        for (n, it) in items.iter().enumerate() {
            for i in 0..it.tokens.len() {
                row_item.push(n);
                row_pos.push(it.cache.len + i);
            }
        }
        let adapters: Vec<Option<&LoraAdapter>> = items.iter().map(|it| it.adapter).collect();
        let mut h = vec![0f32; s * hidden];
        let mut qkv = vec![0f32; s * n_qkv];
        let mut q = vec![0f32; s * qs];
        let mut att = vec![0f32; s * qs];
        let mut o = vec![0f32; s * hidden];
        let mut gu = vec![0f32; s * 2 * inter];
        let mut act = vec![0f32; s * inter];
        let shape = ops::HeadShape {
            nh,
            nkv,
            hd,
            window: c.sliding_window,
        };
        for (li, (layer, pl)) in self.layers.iter().zip(&plain.layers).enumerate() {
            let lows = |pick: fn(&LayerLora) -> &Option<LoraPair>| {
                row_lows(&adapters, &row_item, li, pick)
            };
            ops::rms_norm_rows(&x, &pl.input_norm, eps, &mut h);
            own(&layer.qkv)?.matmul_rows(&h, &mut qkv, &lows(|l| &l.qkv));
            if let Some(b) = &pl.qkv_bias {
                for row in qkv.chunks_exact_mut(n_qkv) {
                    for (v, b) in row.iter_mut().zip(b) {
                        *v += b;
                    }
                }
            }
            for (i, row) in qkv.chunks_exact_mut(n_qkv).enumerate() {
                let p = row_pos[i];
                let cache = &mut *items[row_item[i]].cache;
                let cap = cache.cap;
                let (kc, vc) = &mut cache.raw[li];
                let (cos, sin) = (
                    &plain.cos[p * half..][..half],
                    &plain.sin[p * half..][..half],
                );
                let (qr, kv) = row.split_at_mut(qs);
                let (kr, vr) = kv.split_at_mut(ks);
                for head in qr.chunks_exact_mut(hd) {
                    if let Some(n) = &pl.q_norm {
                        ops::rms_norm_in_place(head, n, eps);
                    }
                    ops::rope(head, cos, sin);
                }
                q[i * qs..][..qs].copy_from_slice(qr);
                for (g, (kh, vh)) in kr.chunks_exact_mut(hd).zip(vr.chunks_exact(hd)).enumerate() {
                    if let Some(n) = &pl.k_norm {
                        ops::rms_norm_in_place(kh, n, eps);
                    }
                    ops::rope(kh, cos, sin);
                    let at = (g * cap + p) * hd;
                    kc.write(at, kh);
                    vc.write(at, vh);
                }
            }
            {
                let mut row = 0;
                let seqs: Vec<ops::AttnSeq<'_>> = items
                    .iter()
                    .map(|it| {
                        let (k, v) = &it.cache.raw[li];
                        let a = ops::AttnSeq {
                            row,
                            rows: it.tokens.len(),
                            pos: it.cache.len,
                            k: k.slice(),
                            v: v.slice(),
                            cap: it.cache.cap,
                        };
                        row += it.tokens.len();
                        a
                    })
                    .collect();
                ops::attention_batch(&q, &seqs, shape, &mut att);
            }
            own(&layer.o)?.matmul_rows(&att, &mut o, &lows(|l| &l.o));
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            ops::rms_norm_rows(&x, &pl.post_norm, eps, &mut h);
            own(&layer.gate_up)?.matmul_rows(&h, &mut gu, &lows(|l| &l.gate_up));
            ops::silu_mul(&gu, inter, &mut act);
            own(&layer.down)?.matmul_rows(&act, &mut o, &lows(|l| &l.down));
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
        }
        // The rows whose logits are wanted, normed into `h`.
        let mut picked = 0;
        let mut row = 0;
        for it in items.iter_mut() {
            let n = it.tokens.len();
            it.cache.len += n;
            let take = match it.want {
                Want::Nothing => 0..0,
                Want::Last => n - 1..n,
                Want::All => 0..n,
            };
            for r in take {
                let src = &x[(row + r) * hidden..][..hidden];
                ops::rms_norm_rows(src, &plain.norm, eps, &mut h[picked * hidden..][..hidden]);
                picked += 1;
            }
            row += n;
        }
        let logits = if picked == 0 {
            Vec::new()
        } else {
            match &self.lm_head.w {
                Weight::Own(head) if self.lm_head.b.is_none() => {
                    let mut logits = vec![0f32; picked * head.rows()];
                    head.matmul(&h[..picked * hidden], &mut logits, None);
                    logits
                }
                _ => {
                    let h =
                        Tensor::from_slice(&h[..picked * hidden], (picked, hidden), &self.device)?;
                    self.lm_head.forward(&h, None)?.flatten_all()?.to_vec1()?
                }
            }
        };
        let vocab = logits.len().checked_div(picked).unwrap_or(0);
        let mut out = Vec::with_capacity(items.len());
        let mut at = 0;
        for it in items.iter() {
            let n = match it.want {
                Want::Nothing => 0,
                Want::Last => 1,
                Want::All => it.tokens.len(),
            };
            out.push(logits[at * vocab..(at + n) * vocab].to_vec());
            at += n;
        }
        Ok(out)
    }
}

/// Each row's LoRA pair of layer `li` for one projection (`pick`): rows of one item share
/// their item's adapter. Empty when no item has an adapter.
fn row_lows<'a>(
    adapters: &[Option<&'a LoraAdapter>],
    row_item: &[usize],
    li: usize,
    pick: fn(&LayerLora) -> &Option<LoraPair>,
) -> Vec<Option<LowRank<'a>>> {
    if adapters.iter().all(Option::is_none) {
        return Vec::new();
    }
    row_item
        .iter()
        .map(|&n| {
            adapters[n]
                .and_then(|a| pick(&a.layers[li]).as_ref())
                .map(LoraPair::rows)
        })
        .collect()
}

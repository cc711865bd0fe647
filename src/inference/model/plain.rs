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

pub(super) fn low(p: Option<&Option<LoraPair>>) -> Option<LowRank<'_>> {
    p.and_then(|p| p.as_ref()).map(LoraPair::rows)
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
    /// [`Model::forward`] on plain slices: the engine's kernels for every matmul (with the
    /// LoRA term inside) and the `ops` functions for the rest, with no candle tensor between
    /// them. Computes what the tensor path computes (the same operations in the same order,
    /// up to float summation order).
    pub(super) fn forward_plain(
        &self,
        plain: &Plain,
        tokens: &[u32],
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
        all: bool,
    ) -> anyhow::Result<Tensor> {
        use crate::inference::ops;
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let (s, pos) = (tokens.len(), cache.len);
        let (hidden, nh, nkv, hd) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
        let [qs, ks, _] = c.qkv_sizes();
        let n_qkv = qs + 2 * ks;
        let inter = c.intermediate_size;
        let half = hd / 2;
        let mut x = match &self.embed {
            Embedding::Own(m) => m.rows_f32(tokens)?,
            other => other
                .lookup(tokens, &self.device)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        };
        let mut h = vec![0f32; s * hidden];
        let mut qkv = vec![0f32; s * n_qkv];
        let mut q = vec![0f32; s * qs];
        let mut att = vec![0f32; s * qs];
        let mut o = vec![0f32; s * hidden];
        let mut gu = vec![0f32; s * 2 * inter];
        let mut act = vec![0f32; s * inter];
        let heads = ops::Heads {
            nh,
            nkv,
            hd,
            cap: cache.cap,
            window: c.sliding_window,
        };
        for (li, (layer, pl)) in self.layers.iter().zip(&plain.layers).enumerate() {
            let lora = adapter.map(|a| &a.layers[li]);
            ops::rms_norm_rows(&x, &pl.input_norm, eps, &mut h);
            own(&layer.qkv)?.matmul(&h, &mut qkv, low(lora.map(|l| &l.qkv)));
            if let Some(b) = &pl.qkv_bias {
                for row in qkv.chunks_exact_mut(n_qkv) {
                    for (v, b) in row.iter_mut().zip(b) {
                        *v += b;
                    }
                }
            }
            let (kc, vc) = &mut cache.raw[li];
            for (i, row) in qkv.chunks_exact_mut(n_qkv).enumerate() {
                let p = pos + i;
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
                    let at = (g * cache.cap + p) * hd;
                    kc[at..at + hd].copy_from_slice(kh);
                    vc[at..at + hd].copy_from_slice(vh);
                }
            }
            ops::attention(&q, kc, vc, pos, heads, &mut att);
            own(&layer.o)?.matmul(&att, &mut o, low(lora.map(|l| &l.o)));
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            ops::rms_norm_rows(&x, &pl.post_norm, eps, &mut h);
            own(&layer.gate_up)?.matmul(&h, &mut gu, low(lora.map(|l| &l.gate_up)));
            ops::silu_mul(&gu, inter, &mut act);
            own(&layer.down)?.matmul(&act, &mut o, low(lora.map(|l| &l.down)));
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
        }
        cache.len = pos + s;
        let rows = if all { s } else { 1 };
        let x = &x[(s - rows) * hidden..];
        ops::rms_norm_rows(x, &plain.norm, eps, &mut h[..rows * hidden]);
        let logits = match &self.lm_head.w {
            Weight::Own(head) if self.lm_head.b.is_none() => {
                let mut logits = vec![0f32; rows * head.rows()];
                head.matmul(&h[..rows * hidden], &mut logits, None);
                Tensor::from_vec(logits, (rows, head.rows()), &self.device)?
            }
            _ => {
                let h = Tensor::from_slice(&h[..rows * hidden], (rows, hidden), &self.device)?;
                self.lm_head.forward(&h, None)?
            }
        };
        Ok(if all { logits } else { logits.squeeze(0)? })
    }
}

//! The candle-tensor forward path: matmuls through candle (any weight format) with the LoRA
//! term added per layer.

use super::*;

/// A matmul weight: Q4_0 / Q4_1 / Q8_0 / the K-quants Q4_K, Q5_K, Q6_K / F32 on the engine's own kernels (float
/// activations; shared, so a tied output head reads the embedding's matrix), anything else
/// on candle's (dense, or quantised with 8-bit activations).
pub(super) enum Weight {
    Candle(QMatMul),
    Own(std::sync::Arc<QuantMatrix>),
}

impl Weight {
    pub(super) fn new(w: QMatMul) -> anyhow::Result<Weight> {
        if let QMatMul::QTensor(q) = &w
            && let Some(format) = Format::from_ggml(q.dtype())
        {
            let (rows, cols) = q.shape().dims2()?;
            return Ok(Weight::Own(std::sync::Arc::new(QuantMatrix::from_bytes(
                format,
                &q.data()?,
                rows,
                cols,
            )?)));
        }
        if let QMatMul::Tensor(t) = &w
            && t.dtype() == DType::F32
            && t.device().is_cpu()
            && let Ok((rows, cols)) = t.dims2()
        {
            let values = t.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            return Ok(Weight::Own(std::sync::Arc::new(QuantMatrix::from_f32(
                values, rows, cols,
            )?)));
        }
        Ok(Weight::Candle(w))
    }

    /// `x·Wᵀ`, plus each row's LoRA term (`lows[r]`; empty: none) when the weight runs on the
    /// engine's own kernels (the caller adds them otherwise).
    pub(super) fn forward(
        &self,
        x: &Tensor,
        lows: &[Option<LowRank<'_>>],
    ) -> candle_core::Result<Tensor> {
        match self {
            // Dense weights kept in bf16 on a GPU: the product in their type, the result
            // back in float32 (the activations' type everywhere else).
            Weight::Candle(QMatMul::Tensor(w)) if w.dtype() != x.dtype() => {
                x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(x.dtype())
            }
            Weight::Candle(w) => w.forward(x),
            Weight::Own(w) => {
                let (s, _) = x.dims2()?;
                let x = x.contiguous()?;
                let mut out = vec![0f32; s * w.rows()];
                {
                    let (storage, layout) = x.storage_and_layout();
                    let candle_core::Storage::Cpu(cpu) = &*storage else {
                        candle_core::bail!("the quantised kernels run on the CPU");
                    };
                    let data = cpu.as_slice::<f32>()?;
                    let xs = &data[layout.start_offset()..layout.start_offset() + x.elem_count()];
                    w.matmul_rows(xs, &mut out, lows);
                }
                Tensor::from_vec(out, (s, w.rows()), x.device())
            }
        }
    }
}

/// One of the engine's own matrices as a candle weight on `device`.
pub(super) fn own_to_candle(
    m: &QuantMatrix,
    device: &Device,
    dense: DType,
) -> anyhow::Result<QMatMul> {
    let dims = vec![m.rows(), m.cols()];
    Ok(match (m.format().ggml(), m.ggml_bytes()) {
        (Some(t), Some(b)) => QMatMul::from_qtensor(qtensor_from_ggml(t, &b, dims, device)?)?,
        _ => QMatMul::Tensor(
            Tensor::from_slice(m.parts().f, (m.rows(), m.cols()), &Device::Cpu)?
                .to_dtype(dense)?
                .to_device(device)?,
        ),
    })
}

/// A candle weight moved to `device` (quantised blocks as they are, dense as `dense`).
pub(super) fn candle_to(w: QMatMul, device: &Device, dense: DType) -> anyhow::Result<QMatMul> {
    Ok(match w {
        QMatMul::QTensor(q) => QMatMul::from_qtensor(qtensor_to(&q, device)?)?,
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
            QMatMul::Tensor(t.to_dtype(dense)?.to_device(device)?)
        }
    })
}

/// A quantised tensor's blocks on `device` (itself when it is already there).
pub(super) fn qtensor_to(q: &QTensor, device: &Device) -> anyhow::Result<QTensor> {
    Ok(qtensor_from_ggml(
        q.dtype(),
        &q.data()?,
        q.shape().dims().to_vec(),
        device,
    )?)
}

/// One linear layer: `y = x·Wᵀ (+ b)`, W quantised or dense.
pub(super) struct Linear {
    pub(super) w: Weight,
    pub(super) b: Option<Tensor>,
}

impl Linear {
    pub(super) fn new(w: QMatMul, b: Option<Tensor>) -> anyhow::Result<Linear> {
        Ok(Linear {
            w: Weight::new(w)?,
            b,
        })
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        lora: Option<&LoraPair>,
    ) -> candle_core::Result<Tensor> {
        let (s, _) = x.dims2()?;
        self.forward_rows(x, &[(0..s, lora)])
    }

    /// [`Linear::forward`] for the rows of several sequences at once (`groups`: each one's
    /// rows and adapter term): one pass over the weights for them all, each group's rows
    /// plus its own low-rank term.
    pub(super) fn forward_rows(
        &self,
        x: &Tensor,
        groups: &[(std::ops::Range<usize>, Option<&LoraPair>)],
    ) -> candle_core::Result<Tensor> {
        let own = matches!(self.w, Weight::Own(_));
        let any_lora = groups.iter().any(|(_, l)| l.is_some());
        let lows: Vec<Option<LowRank<'_>>> = if own && any_lora {
            groups
                .iter()
                .flat_map(|(rows, l)| rows.clone().map(move |_| l.map(LoraPair::rows)))
                .collect()
        } else {
            Vec::new()
        };
        // On the engine's kernels the terms (and a DoRA's gains) are applied in the pass.
        let mut y = self.w.forward(x, &lows)?;
        if !own && any_lora {
            let (_, n) = y.dims2()?;
            // `part` (the rows `rows` of `x·Wᵀ`) plus the adapter's term, times its gains
            // when it is a DoRA.
            let adapted = |rows: &std::ops::Range<usize>, part: Tensor, l: &LoraPair| {
                let part = (part + l.term(&x.narrow(0, rows.start, rows.len())?, n)?)?;
                match l.gains_on(x.device())? {
                    Some(g) => part.broadcast_mul(&g),
                    None => Ok(part),
                }
            };
            y = match groups {
                [(rows, Some(l))] if rows.len() == y.dim(0)? => adapted(rows, y, l)?,
                _ => {
                    let parts = groups
                        .iter()
                        .map(|(rows, l)| {
                            let part = y.narrow(0, rows.start, rows.len())?;
                            match l {
                                Some(l) => adapted(rows, part, l),
                                None => Ok(part),
                            }
                        })
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Tensor::cat(&parts, 0)?
                }
            };
        }
        // The bias last: a DoRA's gains scale `W·x` and the term, not the bias.
        if let Some(b) = &self.b {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// What a DoRA's gains need of this weight: `‖W_i‖²` per output row, and `A·Wᵀ` for the
    /// adapter's stacked A (`a`: `R × in`, row-major), `R × out`. Exact (dequantised) weights,
    /// as PEFT takes them.
    pub(super) fn dora_basis(&self, a: &[f32]) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        match &self.w {
            Weight::Own(m) => {
                let (rows, cols) = (m.rows(), m.cols());
                let ranks = a.len() / cols.max(1);
                let mut aw_t = vec![0f32; ranks * rows];
                // x·Wᵀ with the A rows as x: exact on float weights; on quantised ones the
                // activations stay float on these kernels.
                m.matmul(a, &mut aw_t, None);
                let norms = m.row_norms_sq();
                Ok((norms, aw_t))
            }
            Weight::Candle(w) => {
                let dense = match w {
                    QMatMul::QTensor(q) => q.dequantize(&q.device())?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.clone(),
                }
                .to_dtype(DType::F32)?;
                let (_, cols) = dense.dims2()?;
                let norms = dense.sqr()?.sum(1)?.to_vec1::<f32>()?;
                let a = Tensor::from_slice(a, (a.len() / cols.max(1), cols), dense.device())?;
                let aw = a.matmul(&dense.t()?)?.flatten_all()?.to_vec1::<f32>()?;
                Ok((norms, aw))
            }
        }
    }

    /// The same layer on candle's kernels on `device`: the engine's own matrices go back to
    /// their GGUF blocks (or float values), dense weights become `dense` (bf16 on a GPU).
    pub(super) fn place(self, device: &Device, dense: DType) -> anyhow::Result<Linear> {
        Ok(Linear {
            w: Weight::Candle(match self.w {
                Weight::Own(m) => own_to_candle(&m, device, dense)?,
                Weight::Candle(w) => candle_to(w, device, dense)?,
            }),
            b: self.b.map(|b| b.to_device(device)).transpose()?,
        })
    }

    pub(super) fn bytes(&self) -> usize {
        let w = match &self.w {
            Weight::Own(m) => m.bytes(),
            Weight::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        };
        w + self.b.as_ref().map_or(0, |b| b.elem_count() * 4)
    }

    pub(super) fn describe(&self) -> String {
        match &self.w {
            Weight::Own(m) => format!("{:?} ({} activations)", m.format(), m.activations()),
            Weight::Candle(QMatMul::QTensor(q)) => format!("{:?}", q.dtype()),
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                format!("{:?}", t.dtype())
            }
        }
    }
}

impl Model {
    /// The additive attention mask (`s × (pos+s)`) for a chunk of `s` positions starting at
    /// `pos`: causal, plus the sliding window when the model has one. `None` when nothing is
    /// masked (one position, no window in reach).
    pub(super) fn mask(&self, s: usize, pos: usize) -> anyhow::Result<Option<Tensor>> {
        let t = pos + s;
        let window = self.config.sliding_window.filter(|w| *w < t);
        if s == 1 && window.is_none() {
            return Ok(None);
        }
        let mut m = vec![0f32; s * t];
        for i in 0..s {
            let qpos = pos + i;
            for j in 0..t {
                if j > qpos || window.is_some_and(|w| qpos - j >= w) {
                    m[i * t + j] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (s, t), &self.device)?))
    }

    /// One layer over the rows of every sequence of a step: the matmuls (and their adapters'
    /// terms, per sequence) run once for all rows; attention runs per sequence, over its own
    /// cache.
    pub(super) fn layer_forward(
        &self,
        l: &Layer,
        layer: usize,
        x: &Tensor,
        seqs: &[Seq<'_>],
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let groups = |pick: fn(&LayerLora) -> Option<&LoraPair>| {
            seqs.iter()
                .map(|s| {
                    (
                        s.rows.clone(),
                        s.adapter.and_then(|a| pick(&a.layers[layer])),
                    )
                })
                .collect::<Vec<_>>()
        };
        let h = candle_nn::ops::rms_norm(x, &l.input_norm, eps)?;
        let qkv = l.qkv.forward_rows(&h, &groups(|l| l.qkv.as_ref()))?;
        let mut outs = Vec::with_capacity(seqs.len());
        for s in seqs {
            let qkv = qkv.narrow(0, s.rows.start, s.rows.len())?;
            outs.push(self.attend(l, layer, &qkv, s)?);
        }
        let out = match outs.len() {
            1 => outs.remove(0),
            _ => Tensor::cat(&outs, 0)?,
        };
        let o = l.o.forward_rows(&out, &groups(|l| l.o.as_ref()))?;
        let x = (x + o)?;

        let h = candle_nn::ops::rms_norm(&x, &l.post_norm, eps)?;
        let gu = l
            .gate_up
            .forward_rows(&h, &groups(|l| l.gate_up.as_ref()))?;
        let i = c.intermediate_size;
        let act = (gu.narrow(1, 0, i)?.silu()? * gu.narrow(1, i, i)?)?;
        let d = l.down.forward_rows(&act, &groups(|l| l.down.as_ref()))?;
        x + d
    }

    /// Attention of one sequence's rows (`qkv`: their projections) over its cache, which
    /// takes their keys and values.
    fn attend(
        &self,
        l: &Layer,
        layer: usize,
        qkv: &Tensor,
        seq: &Seq<'_>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let (s, pos) = (seq.rows.len(), seq.pos);
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let n_rep = nh / nkv;
        let [qs, ks, _] = c.qkv_sizes();
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((s, n, hd))?.transpose(0, 1)?.contiguous()
        };
        let mut q = heads(qkv.narrow(1, 0, qs)?, nh)?;
        let mut k = heads(qkv.narrow(1, qs, ks)?, nkv)?;
        let v = heads(qkv.narrow(1, qs + ks, ks)?, nkv)?;
        if let Some(n) = &l.q_norm {
            q = candle_nn::ops::rms_norm(&q, n, eps)?;
        }
        if let Some(n) = &l.k_norm {
            k = candle_nn::ops::rms_norm(&k, n, eps)?;
        }
        let q = candle_nn::rotary_emb::rope(&q.unsqueeze(0)?, seq.cos, seq.sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope(&k.unsqueeze(0)?, seq.cos, seq.sin)?.squeeze(0)?;
        let (k_cache, v_cache) = &seq.cache.layers[layer];
        k_cache.slice_set(&k, 1, pos)?;
        v_cache.slice_set(&v, 1, pos)?;
        let t = pos + s;
        let k_all = k_cache.narrow(1, 0, t)?;
        let v_all = v_cache.narrow(1, 0, t)?;

        // Query heads that share a key/value head are stacked as rows of one matmul.
        let q = q.reshape((nkv, n_rep * s, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut att = (q.matmul(&k_all.t()?)? * scale)?;
        if let Some(m) = seq.mask {
            att = att
                .reshape((nkv, n_rep, s, t))?
                .broadcast_add(m)?
                .reshape((nkv, n_rep * s, t))?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&v_all)?
            .reshape((nh, s, hd))?
            .transpose(0, 1)?
            .reshape((s, nh * hd))
    }
}

/// One sequence's part of a step on the tensor path.
pub(super) struct Seq<'a> {
    /// Its rows among the step's.
    pub(super) rows: std::ops::Range<usize>,
    /// Positions already in its cache.
    pub(super) pos: usize,
    pub(super) cos: &'a Tensor,
    pub(super) sin: &'a Tensor,
    pub(super) mask: Option<&'a Tensor>,
    pub(super) cache: &'a KvCache,
    pub(super) adapter: Option<&'a LoraAdapter>,
}

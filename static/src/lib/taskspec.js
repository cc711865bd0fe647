// The task form: its values, checked by the server's own rules, and conversion to and from
// LlamaFactory YAML. The rules (every numeric field's default and range, the templates, the
// stages…) come from the server (`GET /api/tasks/form`, the one source: src/training/spec.rs);
// nothing here copies them.

/** The form's initial values from the server's rules ('' = leave to the server's default). */
export function defaults(rules) {
  const f = {
    name: '',
    model_name: '',
    dataset_id: '',
    stage: rules.stages[0],
    finetuning_type: rules.finetuning_types[0],
    lora_target: 'all',
    template: '',
    system: '',
    precision: rules.precisions[0],
    gpu_ids: '',
    quantization_bit: '',
    deepspeed: '',
    evaluate_after: false,
    pref_loss: '',
    pref_beta: '',
    lr_scheduler_type: (rules.lr_schedulers || ['cosine'])[0],
    packing: false,
    use_rslora: false,
    use_dora: false,
    pissa: false,
    freeze_trainable_modules: '',
    extra_args: '',
  }
  for (const field of rules.fields) f[field.name] = field.default ?? ''
  return f
}

function numeric(rules) {
  return Object.fromEntries(rules.fields.map((r) => [r.name, r]))
}

/** Field → message for every value the server would refuse. */
export function validate(f, rules) {
  const e = {}
  if (!String(f.name).trim()) e.name = 'Give the task a name.'
  else if (String(f.name).trim().length > rules.max_name_chars) e.name = `At most ${rules.max_name_chars} characters.`
  if (!f.model_name) e.model_name = 'Choose a base model.'
  if (!f.dataset_id) e.dataset_id = 'Choose a dataset.'
  for (const [k, r] of Object.entries(numeric(rules))) {
    const raw = f[k]
    if (raw === '' || raw === null || raw === undefined) {
      if (!r.optional) e[k] = 'Required.'
      continue
    }
    const v = Number(raw)
    if (!Number.isFinite(v)) e[k] = 'Must be a number.'
    else if (r.integer && !Number.isInteger(v)) e[k] = 'Must be a whole number.'
    else if ((r.exclusive_min ? v <= r.min : v < r.min) || v > r.max)
      e[k] = `Between ${r.min}${r.exclusive_min ? ' (exclusive)' : ''} and ${r.max}.`
  }
  const targets = String(f.lora_target).trim()
  if (!targets || !targets.split(',').every((t) => /^[A-Za-z0-9_.]+$/.test(t.trim())))
    e.lora_target = '`all` or module names separated by commas (q_proj,v_proj).'
  if (f.template && !rules.templates.includes(f.template)) e.template = 'Unknown template.'
  if (String(f.gpu_ids || '').trim() && !/^\d+(\s*,\s*\d+)*$/.test(String(f.gpu_ids).trim()))
    e.gpu_ids = 'GPU indices separated by commas (0,2), or empty for any.'
  if (f.pref_beta !== '' && f.pref_beta !== null && f.pref_beta !== undefined && ['dpo', 'kto'].includes(f.stage)) {
    const b = Number(f.pref_beta)
    if (!(Number.isFinite(b) && b > 0 && b <= 10)) e.pref_beta = 'Above 0 and at most 10.'
  }
  if (f.evaluate_after && f.stage === 'sft' && !(Number(f.val_size) > 0))
    e.val_size = 'Hold out some rows (above 0) to evaluate the result on.'
  if (String(f.extra_args || '').trim()) {
    let v = null
    try {
      v = JSON.parse(f.extra_args)
    } catch {
      v = null
    }
    if (!v || typeof v !== 'object' || Array.isArray(v))
      e.extra_args = 'A JSON object of LlamaFactory arguments, e.g. {"optim": "adamw_torch"}.'
  }
  if (f.finetuning_type === 'freeze' && Number(f.freeze_trainable_layers) === 0 && f.freeze_trainable_layers !== '')
    e.freeze_trainable_layers = 'Positive: the last layers; negative: the first ones.'
  if (f.packing && !['sft', 'pt'].includes(f.stage)) e.packing = 'Packing is for sft and pt.'
  if (f.finetuning_type === 'lora' && f.pissa && f.use_dora)
    e.use_dora = "PiSSA's conversion saves an ordinary LoRA, without DoRA's magnitudes: choose one."
  if (f.quantization_bit && f.finetuning_type !== 'lora')
    e.quantization_bit = 'QLoRA quantises the base under a LoRA: choose the LoRA method.'
  if (f.deepspeed) {
    const ids = String(f.gpu_ids || '').trim()
    const n = ids ? ids.split(',').length : Number(f.gpus || 0)
    if (n < 2) e.deepspeed = 'DeepSpeed ZeRO needs 2 or more GPUs (GPUs or GPU ids).'
  }
  return e
}

/** The POST /api/tasks body for the form's values. */
export function toRequest(f, rules) {
  const body = {
    name: String(f.name).trim(),
    model_name: f.model_name,
    dataset_id: f.dataset_id,
    stage: f.stage,
    finetuning_type: f.finetuning_type,
    lora_target: String(f.lora_target).trim(),
    precision: f.precision,
  }
  for (const k of Object.keys(numeric(rules))) {
    if (f[k] !== '' && f[k] !== null && f[k] !== undefined) body[k] = Number(f[k])
  }
  if (f.template) body.template = f.template
  if (String(f.system).trim()) body.system = f.system
  if (f.quantization_bit) body.quantization_bit = Number(f.quantization_bit)
  if (f.deepspeed) body.deepspeed = Number(f.deepspeed)
  if (f.lr_scheduler_type) body.lr_scheduler_type = f.lr_scheduler_type
  if (f.packing) body.packing = true
  if (f.finetuning_type === 'lora') {
    if (f.use_rslora) body.use_rslora = true
    if (f.use_dora) body.use_dora = true
    if (f.pissa) body.pissa = true
  } else delete body.loraplus_lr_ratio
  if (f.finetuning_type === 'freeze') {
    if (String(f.freeze_trainable_modules || '').trim()) body.freeze_trainable_modules = String(f.freeze_trainable_modules).trim()
  } else delete body.freeze_trainable_layers
  if (String(f.extra_args || '').trim()) body.extra_args = JSON.parse(f.extra_args)
  if (f.stage === 'dpo' && f.pref_loss) body.pref_loss = f.pref_loss
  if (['dpo', 'kto'].includes(f.stage) && f.pref_beta !== '' && f.pref_beta !== null && f.pref_beta !== undefined)
    body.pref_beta = Number(f.pref_beta)
  // Evaluate the result and its base on the held-out rows when the task completes (it scores
  // generated answers against the references: supervised data only).
  if (f.evaluate_after && f.stage === 'sft' && Number(f.val_size) > 0) body.eval_split = Number(f.val_size)
  const ids = String(f.gpu_ids || '').trim()
  if (ids) {
    body.gpu_ids = ids.split(',').map((s) => Number(s.trim()))
    delete body.gpus
  }
  return body
}

/** Form values from a task detail (GET /api/tasks/{id}), for cloning. */
export function fromTask(t, rules) {
  const f = defaults(rules)
  for (const k of Object.keys(f)) {
    if (t[k] !== undefined && t[k] !== null) f[k] = t[k]
  }
  f.system = t.system || ''
  f.max_steps = t.max_steps ?? ''
  f.dataset_id = t.dataset_id || ''
  f.gpu_ids = Array.isArray(t.gpu_ids) ? t.gpu_ids.join(',') : ''
  f.quantization_bit = t.quantization_bit ? String(t.quantization_bit) : ''
  f.deepspeed = t.deepspeed ? String(t.deepspeed) : ''
  f.evaluate_after = Boolean(t.eval_split)
  f.pref_loss = t.pref_loss || ''
  f.pref_beta = t.pref_beta ?? ''
  f.freeze_trainable_modules = t.freeze_trainable_modules || ''
  f.extra_args = t.extra_args && Object.keys(t.extra_args).length ? JSON.stringify(t.extra_args) : ''
  return f
}

// ---- LlamaFactory YAML --------------------------------------------------------------------

/** Parses the flat `key: value` YAML LlamaFactory configs use (comments, quotes, numbers). */
export function parseFlatYaml(text) {
  const out = {}
  for (const rawLine of text.split(/\r?\n/)) {
    const line = rawLine.replace(/^\s+/, '')
    if (!line || line.startsWith('#') || line.startsWith('---')) continue
    const m = /^([A-Za-z0-9_.-]+)\s*:\s*(.*)$/.exec(line)
    if (!m) continue
    let v = m[2]
    if (!(v.startsWith('"') || v.startsWith("'"))) v = v.replace(/\s+#.*$/, '')
    v = v.trim()
    let value
    if (v.startsWith('"')) {
      try {
        value = JSON.parse(v)
      } catch {
        value = v.slice(1, -1)
      }
    } else if (v.startsWith("'")) value = v.slice(1, -1).replace(/''/g, "'")
    else if (v === 'true' || v === 'false') value = v === 'true'
    else if (v === 'null' || v === '~' || v === '') value = null
    else if (/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(v)) value = Number(v)
    else value = v
    out[m[1]] = value
  }
  return out
}

const YAML_TO_FORM = {
  stage: 'stage',
  finetuning_type: 'finetuning_type',
  lora_rank: 'lora_rank',
  lora_alpha: 'lora_alpha',
  lora_dropout: 'lora_dropout',
  lora_target: 'lora_target',
  quantization_bit: 'quantization_bit',
  template: 'template',
  default_system: 'system',
  cutoff_len: 'cutoff_len',
  val_size: 'val_size',
  seed: 'seed',
  gradient_accumulation_steps: 'gradient_accumulation_steps',
  max_steps: 'max_steps',
  save_steps: 'save_steps',
  logging_steps: 'logging_steps',
  per_device_train_batch_size: 'batch_size',
  learning_rate: 'learning_rate',
  num_train_epochs: 'epochs',
  pref_loss: 'pref_loss',
  pref_beta: 'pref_beta',
  lr_scheduler_type: 'lr_scheduler_type',
  warmup_ratio: 'warmup_ratio',
  warmup_steps: 'warmup_steps',
  weight_decay: 'weight_decay',
  max_grad_norm: 'max_grad_norm',
  packing: 'packing',
  neftune_noise_alpha: 'neftune_noise_alpha',
  use_rslora: 'use_rslora',
  use_dora: 'use_dora',
  pissa_init: 'pissa',
  loraplus_lr_ratio: 'loraplus_lr_ratio',
  freeze_trainable_layers: 'freeze_trainable_layers',
  freeze_trainable_modules: 'freeze_trainable_modules',
}

// Keys that describe the run's plumbing; ferrotune sets them itself.
const MANAGED = new Set([
  'model_name_or_path', 'dataset', 'dataset_dir', 'output_dir', 'do_train', 'overwrite_cache', 'overwrite_output_dir',
  'preprocessing_num_workers', 'dataloader_num_workers', 'plot_loss', 'save_only_model', 'report_to', 'trust_remote_code',
  'pissa_convert', 'per_device_eval_batch_size', 'eval_strategy', 'eval_steps', 'bf16', 'fp16',
  'quantization_method',
])

/**
 * Applies a LlamaFactory YAML to form values. Returns {form, applied, ignored, model}: the keys
 * used, the keys ferrotune does not take from a config, and the model path it names.
 */
export function applyYaml(form, text, baseModels, rules) {
  const y = parseFlatYaml(text)
  const f = { ...form }
  const applied = []
  const ignored = []
  for (const [k, v] of Object.entries(y)) {
    if (k in YAML_TO_FORM) {
      if (v === null) continue
      const field = YAML_TO_FORM[k]
      f[field] = k === 'template' && !rules.templates.includes(v) ? '' : v
      applied.push(k)
    } else if (!MANAGED.has(k)) ignored.push(k)
  }
  if (y.bf16 === true) f.precision = 'bf16'
  else if (y.fp16 === true) f.precision = 'fp16'
  let model = null
  if (typeof y.model_name_or_path === 'string') {
    const path = y.model_name_or_path.replace(/\/+$/, '')
    const base = path.split('/').pop()
    model = baseModels.find((m) => m.model_path === path || m.name === base || m.name.toLowerCase() === base.toLowerCase())
    if (model) {
      f.model_name = model.name
      applied.push('model_name_or_path')
    } else ignored.push(`model_name_or_path (${base} is not in models/)`)
  }
  if (!String(f.name).trim() && typeof y.output_dir === 'string') {
    // saves/llama3-8b/lora/sft → llama3-8b-lora-sft (ferrotune's own …/output says nothing).
    const n = y.output_dir.replace(/\/+$/, '').replace(/^(\.\/)?saves\//, '').split('/').filter(Boolean).join('-')
    if (n && !n.endsWith('output')) f.name = n.slice(-100)
  }
  return { form: f, applied, ignored }
}

/** The LlamaFactory YAML for the form's values (what the server would run, paths aside). */
export function toYaml(f, modelPath, datasetName) {
  const a = []
  const set = (k, v) => a.push([k, v])
  set('model_name_or_path', modelPath || f.model_name)
  set('trust_remote_code', false)
  set('stage', f.stage)
  set('do_train', true)
  if (['dpo', 'kto'].includes(f.stage)) set('pref_beta', f.pref_beta === '' ? 0.1 : Number(f.pref_beta))
  if (f.stage === 'dpo') set('pref_loss', f.pref_loss || 'sigmoid')
  set('finetuning_type', f.finetuning_type)
  if (f.finetuning_type === 'lora') {
    set('lora_rank', Number(f.lora_rank))
    set('lora_alpha', f.lora_alpha === '' ? Number(f.lora_rank) * 2 : Number(f.lora_alpha))
    set('lora_dropout', Number(f.lora_dropout))
    set('lora_target', String(f.lora_target))
    if (f.use_rslora) set('use_rslora', true)
    if (f.use_dora) set('use_dora', true)
    if (f.pissa) {
      set('pissa_init', true)
      set('pissa_convert', true)
    }
    if (f.loraplus_lr_ratio !== '' && f.loraplus_lr_ratio !== null) set('loraplus_lr_ratio', Number(f.loraplus_lr_ratio))
    if (f.quantization_bit) {
      set('quantization_bit', Number(f.quantization_bit))
      set('quantization_method', 'bnb')
    }
  }
  if (f.finetuning_type === 'freeze') {
    set('freeze_trainable_layers', f.freeze_trainable_layers === '' ? 2 : Number(f.freeze_trainable_layers))
    set('freeze_trainable_modules', String(f.freeze_trainable_modules || '').trim() || 'all')
  }
  set('dataset', datasetName || 'my_dataset')
  if (f.template) set('template', f.template)
  if (String(f.system).trim()) set('default_system', f.system)
  set('cutoff_len', Number(f.cutoff_len))
  set('output_dir', `saves/${String(f.name).trim() || 'ferrotune-task'}`)
  set('logging_steps', Number(f.logging_steps))
  set('save_steps', Number(f.save_steps))
  set('plot_loss', true)
  set('per_device_train_batch_size', Number(f.batch_size))
  set('gradient_accumulation_steps', Number(f.gradient_accumulation_steps))
  set('learning_rate', Number(f.learning_rate))
  set('num_train_epochs', Number(f.epochs))
  if (f.max_steps !== '' && f.max_steps !== null) set('max_steps', Number(f.max_steps))
  set('lr_scheduler_type', f.lr_scheduler_type || 'cosine')
  set('warmup_ratio', f.warmup_ratio === '' ? 0.1 : Number(f.warmup_ratio))
  if (f.warmup_steps !== '' && f.warmup_steps !== null) set('warmup_steps', Number(f.warmup_steps))
  set('weight_decay', f.weight_decay === '' ? 0 : Number(f.weight_decay))
  set('max_grad_norm', f.max_grad_norm === '' ? 1 : Number(f.max_grad_norm))
  if (f.packing) set('packing', true)
  if (f.neftune_noise_alpha !== '' && f.neftune_noise_alpha !== null) set('neftune_noise_alpha', Number(f.neftune_noise_alpha))
  set('seed', Number(f.seed))
  if (f.precision === 'bf16') set('bf16', true)
  if (f.precision === 'fp16') set('fp16', true)
  if (Number(f.val_size) > 0) {
    set('val_size', Number(f.val_size))
    set('eval_strategy', 'steps')
    set('eval_steps', Number(f.save_steps))
  }
  if (String(f.extra_args || '').trim()) {
    try {
      for (const [k, v] of Object.entries(JSON.parse(f.extra_args))) set(k, v)
    } catch {
      // validate() names the field.
    }
  }
  const lines = ['# LlamaFactory 0.9.5 config exported by the ferrotune UI']
  for (const [k, v] of a) lines.push(`${k}: ${typeof v === 'string' || (v && typeof v === 'object') ? JSON.stringify(v) : String(v)}`)
  return lines.join('\n') + '\n'
}

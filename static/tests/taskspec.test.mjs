// Unit tests of the task form's logic (node --test): validation with the server's own rules,
// and LlamaFactory YAML import/export. The rules come from the binary (`ferrotune task-form`,
// what `GET /api/tasks/form` answers): FERROTUNE_BIN names it (make test-ui sets it).
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import test from 'node:test'
import { applyYaml, defaults as formDefaults, fromTask, parseFlatYaml, toRequest, toYaml, validate as check } from '../src/lib/taskspec.js'

const bin = process.env.FERROTUNE_BIN || 'target/debug/ferrotune'
const rules = JSON.parse(execFileSync(bin, ['task-form'], { encoding: 'utf8' }))
const defaults = () => formDefaults(rules)
const validate = (f) => check(f, rules)

const models = [{ name: 'SmolLM2-135M-Instruct', model_path: '/m/SmolLM2-135M-Instruct' }]

test('defaults are valid once model, dataset and name are chosen', () => {
  const f = { ...defaults(), name: 't', model_name: 'SmolLM2-135M-Instruct', dataset_id: 'd' }
  assert.deepEqual(validate(f), {})
  const body = toRequest(f, rules)
  assert.equal(body.epochs, 3)
  assert.equal(body.learning_rate, 5e-5)
  assert.ok(!('lora_alpha' in body) && !('max_steps' in body) && !('template' in body) && !('system' in body))
})

test('out-of-range values are named like the server names them', () => {
  const f = { ...defaults(), name: '', lora_rank: 0, lora_dropout: 0.95, val_size: 0.6, max_steps: 1.5, lora_target: 'q_proj,,v', template: 'nope' }
  const e = validate(f)
  for (const k of ['name', 'model_name', 'dataset_id', 'lora_rank', 'lora_dropout', 'val_size', 'max_steps', 'lora_target', 'template'])
    assert.ok(e[k], k)
})

test('a LlamaFactory example config fills the form', () => {
  const yaml = `### model
model_name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct  # the hub id
### method
stage: sft
finetuning_type: lora
lora_target: all
### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
bf16: true
default_system: 'It''s a test'
output_dir: saves/smollm2/lora/sft
`
  const r = applyYaml(defaults(), yaml, models, rules)
  assert.equal(r.form.model_name, 'SmolLM2-135M-Instruct')
  assert.equal(r.form.learning_rate, 1e-4)
  assert.equal(r.form.batch_size, 1)
  assert.equal(r.form.gradient_accumulation_steps, 8)
  assert.equal(r.form.precision, 'bf16')
  assert.equal(r.form.system, "It's a test")
  assert.equal(r.form.name, 'smollm2-lora-sft')
  assert.deepEqual(r.ignored, [])
})

test('export then import gives the same form', () => {
  const f = { ...defaults(), name: 'x', model_name: 'SmolLM2-135M-Instruct', lora_rank: 4, lora_alpha: 16, max_steps: 8, template: 'smollm2', system: 'Be "brief"', val_size: 0.1 }
  const y = toYaml(f, '/m/SmolLM2-135M-Instruct', 'arith.json')
  assert.equal(parseFlatYaml(y).default_system, 'Be "brief"')
  const back = applyYaml({ ...defaults(), name: 'x' }, y, models, rules).form
  assert.deepEqual(back, f)
})

test('the server\'s rules are the form\'s: its defaults, its ranges, its templates', () => {
  const f = defaults()
  for (const field of rules.fields) {
    if (field.default !== null) assert.equal(f[field.name], field.default, field.name)
  }
  assert.ok(rules.templates.includes('smollm2'))
  // A seed beyond 32 bits is refused here as the server refuses it.
  const e = validate({ ...f, name: 't', model_name: 'm', dataset_id: 'd', seed: 2 ** 32 })
  assert.ok(e.seed, 'seed')
  assert.deepEqual(validate({ ...f, name: 't', model_name: 'm', dataset_id: 'd', seed: 2 ** 32 - 1 }), {})
})

test('a task detail fills the form for cloning', () => {
  const t = { name: 'n', model_name: 'm', dataset_id: 'd', epochs: 2, lora_rank: 16, max_steps: null, system: null }
  const f = fromTask(t, rules)
  assert.equal(f.epochs, 2)
  assert.equal(f.lora_rank, 16)
  assert.equal(f.max_steps, '')
})

test('GPU ids: a comma list goes to the server as numbers, instead of a count', () => {
  const f = { ...defaults(), name: 't', model_name: 'm', dataset_id: 'd', gpus: 1, gpu_ids: '0, 2' }
  assert.deepEqual(validate(f), {})
  const body = toRequest(f, rules)
  assert.deepEqual(body.gpu_ids, [0, 2])
  assert.ok(!('gpus' in body))
  assert.ok(validate({ ...f, gpu_ids: '0;2' }).gpu_ids)
  assert.ok(!('gpu_ids' in toRequest({ ...f, gpu_ids: '' }, rules)))
  assert.equal(fromTask({ name: 'n', gpu_ids: [1, 3] }, rules).gpu_ids, '1,3')
})

test('QLoRA and DeepSpeed: only with a LoRA / with two or more GPUs, sent as numbers', () => {
  const f = { ...defaults(), name: 't', model_name: 'm', dataset_id: 'd', quantization_bit: '4' }
  assert.deepEqual(validate(f), {})
  assert.equal(toRequest(f, rules).quantization_bit, 4)
  assert.ok(validate({ ...f, finetuning_type: 'full' }).quantization_bit)
  assert.ok(!('quantization_bit' in toRequest({ ...f, quantization_bit: '' }, rules)))
  const ds = { ...f, deepspeed: '3', gpus: 1 }
  assert.ok(validate(ds).deepspeed, 'one GPU is not enough')
  assert.deepEqual(validate({ ...ds, gpus: 2 }), {})
  assert.deepEqual(validate({ ...ds, gpu_ids: '0,1' }), {})
  assert.equal(toRequest({ ...ds, gpus: 2 }, rules).deepspeed, 3)
  const back = fromTask({ name: 'n', quantization_bit: 8, deepspeed: 2 }, rules)
  assert.equal(back.quantization_bit, '8')
  assert.equal(back.deepspeed, '2')
  assert.match(toYaml(f, '/m', 'x'), /quantization_bit: 4\n/)
})

test('evaluate when done: the held-out split goes as eval_split, and needs some rows held out', () => {
  const f = { ...defaults(), name: 't', model_name: 'm', dataset_id: 'd', val_size: 0.2, evaluate_after: true }
  assert.deepEqual(validate(f), {})
  assert.equal(toRequest(f, rules).eval_split, 0.2)
  assert.ok(!('eval_split' in toRequest({ ...f, evaluate_after: false }, rules)))
  assert.ok(validate({ ...f, val_size: 0 }).val_size)
  assert.equal(fromTask({ name: 'n', val_size: 0.2, eval_split: 0.2 }, rules).evaluate_after, true)
})

test('preference settings go with their stages only', () => {
  const f = { ...defaults(), name: 't', model_name: 'm', dataset_id: 'd', stage: 'dpo', pref_loss: 'orpo', pref_beta: '0.2' }
  const body = toRequest(f, rules)
  assert.equal(body.pref_loss, 'orpo')
  assert.equal(body.pref_beta, 0.2)
  const kto = toRequest({ ...f, stage: 'kto' }, rules)
  assert.ok(!('pref_loss' in kto))
  assert.equal(kto.pref_beta, 0.2)
  const sft = toRequest({ ...f, stage: 'sft', evaluate_after: true, val_size: 0.2 }, rules)
  assert.ok(!('pref_loss' in sft) && !('pref_beta' in sft))
  assert.equal(sft.eval_split, 0.2)
  // Evaluation scores answers against references: not after a preference stage.
  assert.ok(!('eval_split' in toRequest({ ...f, evaluate_after: true, val_size: 0.2 }, rules)))
  assert.equal(check({ ...f, pref_beta: '0' }, rules).pref_beta, 'Above 0 and at most 10.')
  assert.ok(rules.stages.includes('dpo') && rules.stages.includes('kto') && rules.stages.includes('rm'))
  const yaml = toYaml(f, '/m', 'd')
  assert.match(yaml, /pref_loss: "orpo"/)
  assert.equal(fromTask({ name: 'n', stage: 'dpo', pref_loss: 'ipo', pref_beta: 0.3 }, rules).pref_loss, 'ipo')
})

test('the settings people tune: schedule, regularisation, LoRA variants, freeze-tuning, extra arguments', () => {
  const f = {
    ...defaults(), name: 't', model_name: 'm', dataset_id: 'd', lr_scheduler_type: 'linear', warmup_steps: '5',
    weight_decay: '0.01', max_grad_norm: '0.5', neftune_noise_alpha: '5', packing: true, use_rslora: true,
    pissa: true, loraplus_lr_ratio: '16', freeze_trainable_layers: '3', extra_args: '{"optim": "adamw_torch"}',
  }
  assert.deepEqual(validate(f), {})
  const body = toRequest(f, rules)
  assert.equal(body.lr_scheduler_type, 'linear')
  assert.equal(body.warmup_steps, 5)
  assert.equal(body.weight_decay, 0.01)
  assert.equal(body.neftune_noise_alpha, 5)
  assert.equal(body.packing, true)
  assert.equal(body.use_rslora, true)
  assert.equal(body.pissa, true)
  assert.equal(body.loraplus_lr_ratio, 16)
  assert.ok(!('freeze_trainable_layers' in body), 'a LoRA task sends no freeze setting')
  assert.deepEqual(body.extra_args, { optim: 'adamw_torch' })
  const freeze = toRequest({ ...f, finetuning_type: 'freeze' }, rules)
  assert.equal(freeze.freeze_trainable_layers, 3)
  assert.ok(!('use_rslora' in freeze) && !('pissa' in freeze) && !('loraplus_lr_ratio' in freeze))
  assert.ok(rules.finetuning_types.includes('freeze') && rules.lr_schedulers.includes('cosine'))
  assert.ok(validate({ ...f, extra_args: '[1]' }).extra_args)
  assert.ok(validate({ ...f, extra_args: '{nope' }).extra_args)
  assert.ok(validate({ ...f, stage: 'dpo' }).packing)
  assert.ok(validate({ ...f, weight_decay: '2' }).weight_decay)
  const yaml = toYaml(f, '/m', 'd')
  for (const line of ['lr_scheduler_type: "linear"', 'warmup_steps: 5', 'use_rslora: true', 'pissa_convert: true', 'optim: "adamw_torch"'])
    assert.ok(yaml.includes(line), line)
  const back = applyYaml({ ...defaults(), name: 'x' }, yaml, models, rules)
  assert.equal(back.form.lr_scheduler_type, 'linear')
  assert.equal(back.form.pissa, true)
  assert.equal(back.form.weight_decay, 0.01)
  assert.equal(fromTask({ name: 'n', extra_args: { optim: 'sgd' } }, rules).extra_args, '{"optim":"sgd"}')
  // DoRA: sent, written to the YAML and read back; not with PiSSA (whose conversion drops it).
  assert.ok(validate({ ...f, use_dora: true }).use_dora)
  const dora = { ...f, pissa: false, use_dora: true }
  assert.deepEqual(validate(dora), {})
  assert.equal(toRequest(dora, rules).use_dora, true)
  assert.ok(!('use_dora' in toRequest({ ...dora, finetuning_type: 'freeze' }, rules)))
  const doraYaml = toYaml(dora, '/m', 'd')
  assert.ok(doraYaml.includes('use_dora: true'), doraYaml)
  assert.equal(applyYaml({ ...defaults(), name: 'x' }, doraYaml, models, rules).form.use_dora, true)
  assert.equal(fromTask({ name: 'n', use_dora: true }, rules).use_dora, true)
})

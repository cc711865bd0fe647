// Browser test of the web UI against the real server: Playwright (playwright-core) drives
// Debian's chromium headless through what a researcher does — register and sign in, upload a
// dataset, train a small LoRA for real while watching the chart and the progress, chat with the
// adapter and watch the answer stream — and fails on any JavaScript error on any page.
// Screenshots of every page and the first-load figures go to target/ui-screenshots/.
//
// Run by `make test-ui` (part of `make test`). Environment:
//   FERROTUNE_BIN            the server binary (default target/debug/ferrotune)
//   FERROTUNE_TEST_MODELS_DIR models dir (default <cache>/test-models, shared with cargo tests)
//   FERROTUNE_UI_SCREENSHOTS  where screenshots go (default target/ui-screenshots)
//   FERROTUNE_UI_QUICK=1      skip training and chat with the base model (UI work only)
//   CHROMIUM                  the browser (default /usr/bin/chromium)
import { spawn } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { chromium } from 'playwright-core'

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..')
const BIN = process.env.FERROTUNE_BIN || path.join(ROOT, 'target/debug/ferrotune')
const SHOTS = process.env.FERROTUNE_UI_SCREENSHOTS || path.join(ROOT, 'target/ui-screenshots')
const QUICK = process.env.FERROTUNE_UI_QUICK === '1'
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium'
const MODEL = 'SmolLM2-135M-Instruct'
const MAX_STEPS = 8

function cacheRoot() {
  if (process.env.FERROTUNE_CACHE_DIR) return process.env.FERROTUNE_CACHE_DIR
  if (process.env.XDG_CACHE_HOME) return path.join(process.env.XDG_CACHE_HOME, 'ferrotune')
  return path.join(os.homedir(), '.cache', 'ferrotune')
}
const MODELS = process.env.FERROTUNE_TEST_MODELS_DIR || path.join(cacheRoot(), 'test-models')

const started = Date.now()
const log = (...a) => console.log(`[ui-test ${((Date.now() - started) / 1000).toFixed(1).padStart(6)}s]`, ...a)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

class Failure extends Error {}
function check(cond, message) {
  if (!cond) throw new Failure(message)
}

// ---- a mail relay ---------------------------------------------------------------------------

// A real SMTP server on loopback (the plain RFC 5321 dialogue) keeping the messages it takes,
// so the password reset by e-mail code is tried from the sign-in page.
const mails = []
function startSmtp() {
  const server = net.createServer((socket) => {
    socket.setEncoding('utf8')
    let buf = ''
    let data = null
    let to = []
    socket.write('220 localhost ESMTP test\r\n')
    socket.on('data', (chunk) => {
      buf += chunk
      let nl
      while ((nl = buf.indexOf('\r\n')) >= 0) {
        const line = buf.slice(0, nl)
        buf = buf.slice(nl + 2)
        if (data !== null) {
          if (line === '.') {
            mails.push({ to, data: data.join('\n') })
            data = null
            to = []
            socket.write('250 OK queued\r\n')
          } else data.push(line.startsWith('.') ? line.slice(1) : line)
          continue
        }
        const cmd = line.toUpperCase()
        if (cmd.startsWith('EHLO')) socket.write('250-localhost\r\n250 8BITMIME\r\n')
        else if (cmd.startsWith('RCPT TO:')) {
          to.push(line.slice(8).trim().replace(/^<|>$/g, ''))
          socket.write('250 OK\r\n')
        } else if (cmd === 'DATA') {
          data = []
          socket.write('354 end with <CRLF>.<CRLF>\r\n')
        } else if (cmd.startsWith('QUIT')) {
          socket.end('221 bye\r\n')
        } else socket.write('250 OK\r\n')
      }
    })
    socket.on('error', () => {})
  })
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, url: `smtp://127.0.0.1:${server.address().port}` })))
}

// ---- the server -----------------------------------------------------------------------------

const serverLog = []
let expectHttpError = null
function startServer(dataDir, smtpUrl) {
  check(fs.existsSync(BIN), `${BIN} does not exist: run \`cargo build\` first`)
  fs.mkdirSync(MODELS, { recursive: true })
  // Webhooks may reach loopback here (the test's receiver address is on it).
  const env = { ...process.env, RUST_LOG: 'info', FERROTUNE_AUTO_SETUP: 'true', FERROTUNE_DEFAULT_MODEL: 'smollm2-135m-instruct', FERROTUNE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES: 'true', FERROTUNE_SMTP_URL: smtpUrl }
  delete env.FERROTUNE_CONFIG
  delete env.FERROTUNE_STATIC_DIR
  const child = spawn(BIN, ['serve', '--bind', '127.0.0.1:0', '--data-dir', dataDir, '--models-dir', MODELS], {
    env,
    stdio: ['ignore', 'ignore', 'pipe'],
  })
  return new Promise((resolve, reject) => {
    let buf = ''
    const timer = setTimeout(() => reject(new Failure('the server did not report its address within 60 s')), 60000)
    child.stderr.on('data', (chunk) => {
      buf += chunk.toString()
      let nl
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl)
        buf = buf.slice(nl + 1)
        serverLog.push(line.replace(/\x1b\[[0-9;]*m/g, ''))
        if (process.env.FERROTUNE_TEST_LOG) console.log(`[server] ${line}`)
        const m = /listening on (http:\/\/\S+)/.exec(line)
        if (m) {
          clearTimeout(timer)
          resolve({ child, base: m[1] })
        }
      }
    })
    child.on('exit', (code) => reject(new Failure(`the server exited early (${code}):\n${serverLog.slice(-30).join('\n')}`)))
  })
}

async function api(base, token, p) {
  const res = await fetch(base + p, { headers: { authorization: `Bearer ${token}` } })
  check(res.ok, `${p}: ${res.status}`)
  return res.json()
}

async function waitFor(what, timeoutMs, fn, everyMs = 500) {
  const until = Date.now() + timeoutMs
  for (;;) {
    const v = await fn()
    if (v) return v
    if (Date.now() > until) throw new Failure(`timed out after ${timeoutMs / 1000} s waiting for ${what}`)
    await sleep(everyMs)
  }
}

// ---- the test -------------------------------------------------------------------------------

async function main() {
  fs.rmSync(SHOTS, { recursive: true, force: true })
  fs.mkdirSync(SHOTS, { recursive: true })
  check(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install -y chromium (make test-ui does it)`)
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ferrotune-ui-'))
  const smtp = await startSmtp()
  const { child, base } = await startServer(path.join(tmp, 'data'), smtp.url)
  log(`server at ${base} (models in ${MODELS})`)
  let context = null
  let page = null
  const errors = []
  const warnings = []
  try {
    context = await chromium.launchPersistentContext(path.join(tmp, 'profile'), {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--no-first-run',
      ],
      viewport: { width: 1440, height: 900 },
    })
    page = context.pages()[0] || (await context.newPage())
    page.setDefaultTimeout(30000)
    let where = 'start'
    const watch = (p) => {
      p.on('console', (m) => {
        const text = m.text()
        // The browser logs every HTTP error as a console error: a step that provokes one on
        // purpose (a wrong password) announces it in `expectHttpError` first.
        if (m.type() === 'error' && expectHttpError && text.includes(`status of ${expectHttpError} `)) expectHttpError = null
        else if (m.type() === 'error') errors.push(`[${where}] console error: ${text}`)
        else if (m.type() === 'warning') {
          if (text.includes('[Vue warn]')) errors.push(`[${where}] ${text}`)
          else warnings.push(`[${where}] ${text}`)
        }
      })
      p.on('pageerror', (e) => errors.push(`[${where}] page error: ${e.message}`))
    }
    watch(page)
    let shot = 0
    const snap = async (name, p = page) => {
      shot++
      const file = path.join(SHOTS, `${String(shot).padStart(2, '0')}-${name}.png`)
      await p.screenshot({ path: file, fullPage: true })
    }
    const visit = async (p, name) => {
      where = name
      await page.goto(base + p)
    }

    // -- first load: bytes over the wire and time, on a fresh profile (nothing cached)
    where = 'sign-in'
    const cdp = await context.newCDPSession(page)
    await cdp.send('Network.enable')
    const sizes = new Map()
    cdp.on('Network.loadingFinished', (e) => sizes.set(e.requestId, e.encodedDataLength))
    const t0 = Date.now()
    await page.goto(base + '/')
    await page.locator('[data-test=auth-submit]').waitFor()
    const visibleMs = Date.now() - t0
    await page.waitForLoadState('networkidle')
    const nav = await page.evaluate(() => {
      const n = performance.getEntriesByType('navigation')[0]
      const res = performance.getEntriesByType('resource').map((r) => ({ name: r.name.replace(location.origin, ''), transfer: r.transferSize, decoded: r.decodedBodySize }))
      return { domContentLoaded: n.domContentLoadedEventEnd, load: n.loadEventEnd, resources: res, html: { transfer: n.transferSize, decoded: n.decodedBodySize } }
    })
    const wire = [...sizes.values()].reduce((a, b) => a + b, 0)
    const firstLoad = {
      url: '/ (→ /login, signed out)',
      requests: sizes.size,
      bytes_over_the_wire: wire,
      bytes_decoded: nav.html.decoded + nav.resources.reduce((a, r) => a + r.decoded, 0),
      dom_content_loaded_ms: Math.round(nav.domContentLoaded),
      load_event_ms: Math.round(nav.load),
      sign_in_form_visible_ms: visibleMs,
      files: [{ name: '/ (index.html)', transfer: nav.html.transfer, decoded: nav.html.decoded }, ...nav.resources],
    }
    await cdp.send('Network.disable')
    log(`first load: ${firstLoad.requests} requests, ${wire} bytes over the wire, load ${firstLoad.load_event_ms} ms, form visible after ${visibleMs} ms`)
    check(page.url().endsWith('/login'), `signed out, / should lead to /login, not ${page.url()}`)
    await snap('sign-in')

    // -- register (with the form's validation first), then sign out and in again
    where = 'register'
    await page.click('[data-test=tab-register]')
    await page.fill('#username', 'ab')
    await page.fill('#email', 'not-an-email')
    await page.fill('#password', 'short')
    await page.fill('#confirm', 'other')
    await page.click('[data-test=auth-submit]')
    await page.getByText('3 to 20 characters').waitFor()
    await page.getByText('Enter a valid email address.').waitFor()
    await page.getByText('At least 8 characters.').waitFor()
    await page.getByText('The passwords do not match.').waitFor()
    await snap('register-validation')
    await page.fill('#username', 'researcher')
    await page.fill('#email', 'researcher@example.com')
    await page.fill('#password', 'correct horse')
    await page.fill('#confirm', 'correct horse')
    await page.click('[data-test=auth-submit]')
    await page.waitForURL(base + '/')
    where = 'dashboard'
    await page.locator('[data-test=resources]').getByText('Memory').waitFor()
    log('registered and signed in')

    await page.click('[data-test=sign-out]')
    await page.waitForURL(/\/login$/)
    await visit('/datasets', 'protected route')
    await page.waitForURL(/\/login\?next=/)
    where = 'sign-in'
    await page.fill('#login', 'researcher')
    await page.fill('#password', 'correct horse')
    await page.click('[data-test=auth-submit]')
    await page.waitForURL(base + '/datasets')
    log('signed out, a protected route asked to sign in, and led back after it')

    // The API, for waiting on what the page does not need to show.
    const login = await (
      await fetch(base + '/api/auth/login', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ username_or_email: 'researcher', password: 'correct horse' }),
      })
    ).json()
    const token = login.access_token

    // -- datasets: upload (size limit shown), list, preview
    where = 'datasets'
    await page.locator('[data-test=upload-limit]').getByText('100 MiB').waitFor()
    const rows = []
    for (let i = 1; i <= 16; i++) {
      const a = (i % 7) + 1
      const b = (i % 5) + 2
      rows.push({ instruction: `What is ${a} plus ${b}?`, input: '', output: `${a} plus ${b} is ${a + b}.` })
    }
    await page.setInputFiles('[data-test=file-input]', { name: 'arith.json', mimeType: 'application/json', buffer: Buffer.from(JSON.stringify(rows)) })
    const row = page.locator('tr[data-dataset="arith.json"]')
    await row.waitFor()
    check((await row.locator('[data-test=rows]').innerText()).trim() === '16', 'the dataset shows 16 rows')
    await snap('datasets')
    await row.getByRole('link', { name: 'arith.json' }).click()
    await page.locator('[data-test=preview-table]').getByText('What is 2 plus 3?').first().waitFor()
    await snap('dataset-preview')
    await page.keyboard.press('Escape')
    check((await row.locator('[data-test=kind]').innerText()).trim() === 'supervised', 'the dataset is supervised data')
    // Preference pairs in OpenAI's DPO shape are told apart (and stored as LlamaFactory reads them).
    const prefs = rows.slice(0, 4).map((r) => ({
      input: { messages: [{ role: 'user', content: r.instruction }] },
      preferred_output: [{ role: 'assistant', content: r.output }],
      non_preferred_output: [{ role: 'assistant', content: 'No idea.' }],
    }))
    await page.setInputFiles('[data-test=file-input]', { name: 'prefs.jsonl', mimeType: 'application/jsonl', buffer: Buffer.from(prefs.map((p) => JSON.stringify(p)).join('\n')) })
    const prefRow = page.locator('tr[data-dataset="prefs.jsonl"]')
    await prefRow.waitFor()
    check((await prefRow.locator('[data-test=kind]').innerText()).trim() === 'preference pairs', 'the DPO file is preference data')
    log('uploaded and previewed the dataset')

    // -- the environment and the model must be there before training (cached on CI)
    if (!QUICK) {
      await waitFor('the training environment and the default model', 20 * 60000, async () => {
        const s = await api(base, token, '/api/system/status')
        check(s.environment.state !== 'failed', `environment install failed: ${JSON.stringify(s.environment)}`)
        check(s.model_pull.state !== 'failed', `model pull failed: ${JSON.stringify(s.model_pull)}`)
        return s.environment.state === 'ready' && s.models.includes(MODEL)
      }, 2000)
    }

    // -- new task from the dataset's "Use" button
    where = 'new task'
    await row.locator('[data-test=use]').click()
    await page.waitForURL(/\/tasks\/new\?dataset=/)
    await page.locator(`[data-test=model-select] option[value="${MODEL}"]`).waitFor({ state: 'attached' })
    await page.selectOption('[data-test=model-select]', MODEL)
    check((await page.inputValue('[data-test=dataset-select]')) !== '', 'the dataset is selected')
    // Only the stages that fit the dataset are offered.
    const stageOptions = await page.locator('[data-test=stage-select] option').evaluateAll((os) => os.map((o) => o.value))
    check(JSON.stringify(stageOptions) === '["sft"]', `supervised data trains with sft only: ${stageOptions}`)
    await page.fill('[data-test=task-name]', 'ui-arith')
    await page.fill('[data-test=epochs]', '1')
    await page.fill('[data-test=learning-rate]', '0.001')
    await page.fill('[data-test=batch-size]', '4')
    await page.click('[data-test=advanced]')
    await page.fill('[data-test=lora-rank]', '4')
    await page.fill('[data-test=cutoff-len]', '64')
    await page.fill('[data-test=logging-steps]', '1')
    await page.fill('[data-test=save-steps]', '5')
    await page.fill('[data-test=max-steps]', String(MAX_STEPS))
    await snap('new-task')

    let taskUrl = null
    if (!QUICK) {
      await page.click('[data-test=start-training]')
      await page.waitForURL(/\/tasks\/[0-9a-f-]{8,}$/)
      taskUrl = page.url()
      where = 'task'
      log(`task submitted: ${taskUrl}`)

      // -- while it runs, in a second tab: a clone waits in the queue, and is cancelled
      const root = page.locator('[data-status]').first()
      await waitFor('the task to start', 20 * 60000, async () => (await root.getAttribute('data-status')) !== 'queued', 250)
      const tab = await context.newPage()
      watch(tab)
      await tab.goto(taskUrl)
      await tab.getByRole('button', { name: 'Clone', exact: true }).click()
      await tab.waitForURL((u) => u.href !== taskUrl && /\/tasks\/[0-9a-f-]{8,}$/.test(u.href))
      await tab.locator('[data-status=queued]').first().waitFor()
      await tab.getByText('#1 in the queue').first().waitFor()
      await snap('task-queued', tab)
      await tab.click('[data-test=cancel]')
      await tab.click('[data-test=confirm]')
      await tab.locator('div[data-status=cancelled]').waitFor()
      await tab.close()
      await page.bringToFront()
      log('a clone queued behind the running task and was cancelled')

      // -- watch it: the progress text and the chart must move while it runs. Sampled in the
      // page at every frame, so fast steps are not missed.
      const trainStart = Date.now()
      const sampler = page.waitForFunction(
        () => {
          const w = window
          const seen = (w.__progress = w.__progress || { texts: [], points: [] })
          const root = document.querySelector('[data-status]')
          const status = root && root.getAttribute('data-status')
          const text = (document.querySelector('[data-test=progress-text]') || {}).innerText || ''
          const chart = document.querySelector('.loss-chart')
          const points = Number((chart && chart.getAttribute('data-points')) || 0)
          if (status === 'running') {
            if (/^Step \d+ \/ \d+/.test(text.trim()) && !seen.texts.includes(text.trim())) seen.texts.push(text.trim())
            if (!seen.points.includes(points)) seen.points.push(points)
          }
          if (['completed', 'failed', 'cancelled'].includes(status)) return { status, ...seen }
          return false
        },
        null,
        { polling: 'raf', timeout: 20 * 60000 },
      )
      // A screenshot mid-run, when there is something to see (a fast run may not wait for it).
      const midRun = page
        .waitForFunction(
          () => {
            const root = document.querySelector('[data-status]')
            const chart = document.querySelector('.loss-chart')
            return root && root.getAttribute('data-status') === 'running' && chart && Number(chart.getAttribute('data-points')) >= 3
          },
          null,
          { polling: 'raf', timeout: 20 * 60000 },
        )
        .then(async () => {
          await snap('task-running')
          log(`training: ${(await page.locator('[data-test=progress-text]').innerText()).trim()}`)
        })
        .catch(() => {})
      const watched = await (await sampler).jsonValue()
      await midRun
      log(`${watched.status} after ${((Date.now() - trainStart) / 1000).toFixed(0)} s; while running, saw ${watched.texts.join(' | ')}; chart points ${watched.points.join(', ')}`)
      if (watched.status !== 'completed') {
        const why = await page.locator('[data-test=diagnosis]').innerText().catch(() => '?')
        throw new Failure(`the task ended ${watched.status}: ${why}`)
      }
      check(watched.texts.length >= 3, `the progress should update live while running (saw ${watched.texts.join(', ') || 'nothing'})`)
      check(watched.points.filter((n) => n > 0).length >= 2, `the chart should grow while running (saw ${watched.points.join(', ')} points)`)
      // the ending is announced from the server's notification stream (a toast; a browser
      // notification when allowed)
      await page.getByText('Task “ui-arith” finished.').waitFor({ timeout: 10000 })
      await page.locator(`.loss-chart[data-points="${MAX_STEPS}"]`).waitFor({ state: 'attached', timeout: 15000 })
      await page.locator('[data-test=chat-with-result]').waitFor()
      check((await page.locator('[data-test=progress]').getAttribute('aria-valuenow')) === '100', 'the progress bar ends at 100%')
      check((await page.locator('[data-test=log]').innerText()).length > 100, 'the log tail shows the worker output')
      await page.locator('canvas').first().waitFor()
      await snap('task-completed')

      // -- the task list shows it completed
      await visit('/tasks', 'tasks')
      await page.locator('tr[data-task="ui-arith"] [data-status=completed]').waitFor()
      await snap('tasks')
      // the administrator's view of every user's tasks names the owner
      await page.locator('[data-test=all-users] input').check()
      await page.locator('tr[data-task="ui-arith"]').getByText('researcher').waitFor()
      await page.locator('[data-test=all-users] input').uncheck()

      // -- the run beside its cancelled clone: tick both, compare: one chart with a curve
      // each, a row each, and the table as CSV
      const picks = page.locator('[data-test=pick]')
      await picks.nth(0).check()
      await picks.nth(1).check()
      await page.click('[data-test=compare-picked]')
      where = 'compare'
      await page.waitForURL(/\/tasks\/compare\?ids=/)
      await page.locator('[data-test=compare-chart][data-series="2"] canvas').waitFor()
      await page.locator('[data-test=compare-table] tr[data-run="ui-arith"]').waitFor()
      check((await page.locator('[data-test=compare-table] tbody tr').count()) === 2, 'a row per compared run')
      const [csvFile] = await Promise.all([page.waitForEvent('download'), page.click('[data-test=compare-csv]')])
      const csvLines = fs.readFileSync(await csvFile.path(), 'utf8').trim().split('\n')
      check(csvLines.length === 3 && csvLines[0].startsWith('task_id,name,status,steps,final_loss'), `the comparison as CSV: ${csvLines.join(' / ')}`)
      await snap('compare')

      // -- models: the adapter, and "chat with this"
      await visit('/models', 'models')
      await page.locator('[data-test=trained-models] tbody tr').first().waitFor()
      await snap('models')
      const [saved] = await Promise.all([page.waitForEvent('download'), page.locator('[data-test=download-model]').first().click()])
      const savedPath = await saved.path()
      check(saved.suggestedFilename().endsWith('.tar.gz') && fs.statSync(savedPath).size > 100000, `the adapter downloads (${saved.suggestedFilename()})`)
      // bring your own adapter: the downloaded archive uploaded through the form comes back as
      // another model of this user's, checked against its base
      await page.setInputFiles('[data-test=adapter-file]', { name: 'uploaded-arith.tar.gz', mimeType: 'application/gzip', buffer: fs.readFileSync(savedPath) })
      await page.click('[data-test=adapter-submit]')
      await page.getByText('Added uploaded-arith').waitFor()
      await page.locator('[data-test=trained-models]').getByText('uploaded-arith').waitFor()
      await snap('models-uploaded-adapter')
      // export: the adapter merged into a Q4_K_M GGUF, a job with progress; the result's
      // retention of the fine-tune is shown and its GGUF downloads as it is
      await page.locator('[data-test=export-model]').first().click()
      await page.selectOption('[data-test=export-format]', 'gguf')
      await page.selectOption('[data-test=export-quant]', 'q4_k_m')
      await page.fill('[data-test=export-name]', 'arith-q4km')
      await page.click('[data-test=export-submit]')
      await page.locator('[data-test=exports] tr[data-status=succeeded]').waitFor({ timeout: 180000 })
      const retention = await page.locator('[data-test=retention]').first().innerText()
      check(/keeps [0-9.]+ %/.test(retention), `the export shows its retention (${retention})`)
      await page.locator('[data-test=trained-models]').getByText('arith-q4km').waitFor()
      await snap('models-exported')
      const gguf = page.locator('[data-test=export-file]', { hasText: '.gguf' }).first()
      const [ggufDownload] = await Promise.all([page.waitForEvent('download'), gguf.click()])
      const ggufBytes = fs.readFileSync(await ggufDownload.path())
      check(ggufDownload.suggestedFilename() === 'arith-q4km.Q4_K_M.gguf' && ggufBytes.subarray(0, 4).toString() === 'GGUF' && ggufBytes.length > 50e6,
        `the GGUF downloads as it is (${ggufDownload.suggestedFilename()}, ${ggufBytes.length} bytes)`)
      // -- evaluations: the adapter and its base on two rows of the dataset, before and after
      await visit('/evaluations', 'evaluations')
      const adapterOption = page.locator('[data-test=eval-model] option', { hasText: 'ui-arith (adapter)' }).first()
      await page.selectOption('[data-test=eval-model]', await adapterOption.getAttribute('value'))
      await page.selectOption('[data-test=eval-dataset]', { index: 0 })
      await page.fill('[data-test=eval-max-samples]', '2')
      await page.click('[data-test=eval-submit]')
      await page.locator('[data-test=evaluations] tr[data-evaluation=candidate]').waitFor()
      await page.locator('[data-test=eval-compare]').first().waitFor({ timeout: 300000 })
      await page.locator('[data-test=eval-compare]').first().click()
      await page.locator('[data-test=eval-rows] tbody tr').nth(1).waitFor()
      const bleu = await page.locator('[data-test=eval-metrics] tr[data-metric=bleu_4] td').allInnerTexts()
      check(bleu.length === 4 && Number(bleu[2]) > Number(bleu[1]), `the fine-tune's BLEU-4 beats its base's (${bleu.join(' | ')})`)
      await snap('evaluation-before-after')
      await visit('/models', 'models')
      await page.locator('[data-test=chat-model]').first().click()
      await page.waitForURL(/\/chat\?model=/)
    } else {
      await visit('/models', 'models')
      await page.locator('[data-test=base-models] tbody tr').first().waitFor()
      await snap('models')
      await visit(`/chat?model=${MODEL}`, 'chat')
    }

    // -- chat: the answer streams in
    where = 'chat'
    await page.getByRole('button', { name: 'Settings' }).click()
    await page.fill('[data-test=max-tokens]', '12')
    await page.fill('[data-test=chat-input]', 'What is 3 plus 4?')
    await page.keyboard.press('Enter')
    // Sampled in the page at every frame: the partial answer's lengths while it streams.
    const lengthsSeen = await page.waitForFunction(
      () => {
        const w = window
        w.__lengths = w.__lengths || []
        const live = document.querySelector('[data-test=answer-streaming]')
        if (live) {
          const n = live.innerText.trim().length
          if (n > 0 && !w.__lengths.includes(n)) w.__lengths.push(n)
          return false
        }
        return document.querySelector('[data-test=answer]') ? w.__lengths : false
      },
      null,
      { polling: 'raf', timeout: 180000 },
    )
    const lengths = new Set(await lengthsSeen.jsonValue())
    const answer = (await page.locator('[data-test=answer]').first().innerText()).trim()
    log(`answer: ${JSON.stringify(answer)} (partial lengths seen while streaming: ${[...lengths].join(', ')})`)
    check(answer.length > 0, 'the answer is not empty')
    check(lengths.size >= 2, `the answer should arrive in pieces (saw lengths ${[...lengths].join(', ')})`)
    await page.locator('[data-test=sessions] [data-session="What is 3 plus 4?"]').waitFor()
    await snap('chat')

    // compare mode: two models side by side (layout only: generation is what the chat above
    // tested, and each answer costs a prompt pass on this CPU)
    await page.click('[data-test=compare]')
    await page.locator('[data-test=column-1]').waitFor()
    await page.locator('[data-test=model-picker-1]').waitFor()
    await snap('chat-compare')
    await page.click('[data-test=compare]')
    log('chatted; compare mode shows two columns')

    // a reasoning model's thinking shows folded above its answer (a saved conversation)
    where = 'chat (reasoning)'
    const saved = await fetch(base + '/api/chat/sessions', {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: JSON.stringify({
        title: 'Thinking',
        model: MODEL,
        messages: [
          { role: 'user', content: 'Is 7 a prime?' },
          { role: 'assistant', content: '<think>\nOnly 1 and 7 divide it.\n</think>\n\nYes, 7 is prime.' },
        ],
      }),
    })
    check(saved.status === 201, `saving a conversation: ${saved.status}`)
    await visit('/chat', 'chat (reasoning)')
    await page.locator('[data-test=sessions] [data-session="Thinking"]').click()
    const fold = page.locator('[data-test=reasoning]')
    await fold.waitFor()
    check(!(await fold.evaluate((d) => d.open)), 'the reasoning starts folded')
    await fold.locator('summary').click()
    check((await fold.innerText()).includes('Only 1 and 7 divide it.'), 'the reasoning shows when unfolded')
    const shown = (await page.locator('[data-test=answer]').last().innerText()).trim()
    check(shown === 'Yes, 7 is prime.', `the answer is shown without its reasoning: ${JSON.stringify(shown)}`)
    await snap('chat-reasoning')
    log('reasoning folds above the answer')

    // -- API keys
    await visit('/keys', 'keys')
    await page.fill('[data-test=key-name]', 'notebook')
    await page.click('[data-test=create-key]')
    const key = await page.locator('[data-test=new-key]').inputValue()
    check(key.startsWith('ft-'), `a new key starts with ft- (${key.slice(0, 3)})`)
    await snap('api-key')
    await page.keyboard.press('Escape')
    await page.locator('[data-test=keys-table]').getByText('notebook').waitFor()

    // -- changing the password: a wrong current one is refused; the right one keeps this
    // session signed in (the page goes on working below) and the new password signs in
    expectHttpError = 422
    await page.fill('[data-test=pw-current]', 'wrong horse')
    await page.fill('[data-test=pw-new]', 'battery staple')
    await page.fill('[data-test=pw-again]', 'battery staple')
    await page.click('[data-test=pw-save]')
    await page.locator('[data-test=pw-error]').getByText('not correct').waitFor()
    await waitFor('the wrong password answered 422', 5000, async () => expectHttpError === null)
    await page.fill('[data-test=pw-current]', 'correct horse')
    await page.click('[data-test=pw-save]')
    await page.getByText('Password changed').waitFor()
    const relogin = await fetch(`${base}/api/auth/login`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ username_or_email: 'researcher', password: 'battery staple' }),
    })
    check(relogin.status === 200, `the new password signs in (${relogin.status})`)
    log('changed the password')

    // -- the profile: a display name shows in the header; where the account is signed in
    // (this browser, and the sign-in just made by hand), and "sign out other devices"
    where = 'profile'
    await visit('/keys', 'account')
    await page.fill('[data-test=profile-name]', 'Rea Searcher')
    await page.click('[data-test=profile-save]')
    await page.getByText('Profile saved').waitFor()
    await page.locator('header').getByText('Rea Searcher').waitFor()
    await page.locator('[data-test=sessions-table] tr[data-current="true"]').waitFor()
    await waitFor('two sessions listed', 10000, async () => (await page.locator('[data-test=sessions-table] tbody tr').count()) === 2)
    await page.locator('[data-test=recent-sign-ins] li').first().waitFor()
    await snap('account-sessions')
    await page.click('[data-test=end-others]')
    await page.getByRole('button', { name: 'Sign out others' }).click()
    await page.getByText('Signed out 1 other session').waitFor()
    await waitFor('one session left', 10000, async () => (await page.locator('[data-test=sessions-table] tbody tr').count()) === 1)
    const other = await fetch(`${base}/api/auth/me`, { headers: { authorization: `Bearer ${(await relogin.json()).access_token}` } })
    check(other.status === 401, `the other sign-in is signed out (${other.status})`)
    log('edited the profile and signed out the other session')

    // -- a webhook: added (its secret shown once), a test event to a port nobody listens
    // on is logged as not delivered
    where = 'webhooks'
    await page.fill('[data-test=hook-url]', 'http://127.0.0.1:9/hook')
    await page.click('[data-test=hook-add]')
    const secret = await page.locator('[data-test=hook-secret]').inputValue()
    check(secret.startsWith('whsec_'), 'the webhook secret is shown once')
    await page.getByRole('button', { name: 'Done' }).click()
    await page.locator('[data-test=hook-test]').first().click()
    await page.locator('[data-test=hook-delivery]').first().getByText('could not deliver').waitFor()
    await snap('webhooks')
    log('added a webhook and sent a test event')

    // -- administration (the first account is the admin)
    await visit('/admin', 'admin')
    await page.locator('[data-test=users-table]').getByText('researcher@example.com').waitFor()
    await page.locator('[data-test=admin-stats]').waitFor()
    // each user's disk use: the researcher's datasets and task folders
    await page.locator('[data-test=disk-table] tr[data-user="researcher"]').waitFor()
    await snap('admin')

    // -- the activity (audit) log: the password change just made, from this machine; the
    // dataset uploads under their filter
    where = 'activity'
    await visit('/activity', 'activity')
    const changed = page.locator('[data-test=audit-table] tr[data-action="auth.password_change"]').first()
    await changed.waitFor()
    check((await changed.textContent()).includes('127.0.0.1'), 'the audit entry names the client address')
    await page.selectOption('[data-test=audit-action]', 'dataset.')
    await page.click('[data-test=audit-search]')
    // The filtered list replaces the whole one: the password change goes, the uploads stay.
    await page.locator('[data-test=audit-table] tr[data-action="auth.password_change"]').first().waitFor({ state: 'detached' })
    await page.locator('[data-test=audit-table] tr[data-action="dataset.upload"]').first().waitFor()
    await snap('activity')
    // an entry's request id opens what the server logged while answering it
    await page.locator('[data-test=audit-table] tr[data-action="dataset.upload"] a').first().click()
    where = 'server log'
    await page.waitForURL(/\/logs\?/)
    await page.locator('[data-test=log-table] tbody tr').first().waitFor()
    check(
      (await page.locator('[data-test=log-table]').innerText()).includes('dataset uploaded'),
      'the upload request’s log lines are shown',
    )
    await snap('server-log')
    log('followed an audit entry to its log lines')

    // -- "Add model" (administrators): the form reaches the server and shows its answer; a
    // folder already in the models dir is refused with 409 (the hub pull itself is covered by
    // tests/hub.rs against a loopback hub)
    where = 'add model'
    await visit('/models', 'models (admin)')
    await page.locator('[data-test=add-model]').waitFor()
    await page.click('[data-test=add-from-folder]')
    expectHttpError = 409
    await page.fill('[data-test=register-path]', path.join(MODELS, MODEL))
    await page.click('[data-test=add-submit]')
    await page.getByText('inside the models folder').waitFor()
    await waitFor('the folder inside the models dir answered 409', 5000, async () => expectHttpError === null)
    await page.click('[data-test=add-from-hub]')
    await page.locator('[data-test=pull-repo]').waitFor()
    await snap('add-model')

    // -- a new task from an earlier one (what the failure panel's button opens)
    if (taskUrl) {
      where = 'task'
      await page.goto(taskUrl)
      await page.getByRole('button', { name: 'Edit as new' }).click()
      where = 'new task (clone)'
      await page.waitForURL(/\/tasks\/new\?clone=/)
      await waitFor('the cloned settings', 10000, async () => (await page.inputValue('[data-test=task-name]')) === 'ui-arith (2)')
      check((await page.inputValue('[data-test=max-steps]')) === String(MAX_STEPS), 'cloned max_steps')
      await snap('new-task-cloned')
    }

    // -- the dashboard with data, a not-found page, and the dark theme
    await visit('/', 'dashboard')
    await page.locator('[data-test=resources]').getByText('Memory').waitFor()
    if (!QUICK) await page.locator('[data-test=count-tasks]').getByText('2').waitFor()
    await snap('dashboard')
    await visit('/no/such/page', 'not found')
    await page.getByText('Page not found').waitFor()
    await page.click('[data-test=theme-toggle]')
    check((await page.evaluate(() => document.documentElement.dataset.theme)) === 'dark', 'the theme toggles to dark')
    await visit('/', 'dashboard (dark)')
    await page.locator('[data-test=resources]').getByText('Memory').waitFor()
    await snap('dashboard-dark')
    if (taskUrl) {
      where = 'task (dark)'
      await page.goto(taskUrl)
      await page.locator('canvas').first().waitFor()
      await snap('task-dark')
    }
    await visit('/chat', 'chat (dark)')
    await page.locator('[data-test=sessions] .session').first().waitFor()
    await page.locator('[data-test=sessions] .session').first().click()
    await page.locator('[data-test=answer]').first().waitFor()
    await snap('chat-dark')

    // -- the API reference, rendered from /openapi.json by the bundled RapiDoc: every request
    // stays on this server (no fonts or scripts from elsewhere)
    const offsite = []
    const onRequest = (r) => {
      if (!r.url().startsWith(base) && !r.url().startsWith('data:') && !r.url().startsWith('blob:')) offsite.push(r.url())
    }
    page.on('request', onRequest)
    await visit('/docs', 'API reference')
    await page.locator('rapi-doc').getByText('/api/tasks/{id}/events').first().waitFor({ timeout: 30000 })
    await snap('api-docs')
    page.off('request', onRequest)
    check(offsite.length === 0, `the API reference fetched from elsewhere: ${offsite.join(', ')}`)

    // -- a forgotten password: "Forgot your password?" on the sign-in page mails a code (to the
    // test's SMTP server); the code and a new password sign in again
    where = 'password reset'
    await visit('/', 'dashboard (before signing out)')
    await page.click('[data-test=sign-out]')
    await page.waitForURL(/\/login/)
    await page.click('[data-test=forgot]')
    await page.fill('[data-test=reset-email]', 'researcher@example.com')
    await page.click('[data-test=reset-submit]')
    await page.locator('[data-test=reset-code]').waitFor()
    await waitFor('the reset e-mail', 15000, async () => mails.some((m) => m.to.includes('researcher@example.com')))
    const code = /\b(\d{8})\b/.exec(mails.find((m) => m.to.includes('researcher@example.com')).data)[1]
    await page.fill('[data-test=reset-code]', code)
    await page.fill('[data-test=reset-password]', 'a reset password')
    await page.click('[data-test=reset-submit]')
    await page.getByText('Password changed: sign in with it').waitFor()
    await snap('password-reset')
    await page.fill('#password', 'a reset password')
    await page.click('[data-test=auth-submit]')
    await page.waitForURL((u) => !u.pathname.startsWith('/login'))
    log('reset the password with an e-mailed code and signed in with it')

    fs.writeFileSync(path.join(SHOTS, 'first-load.json'), JSON.stringify(firstLoad, null, 2))
    if (warnings.length) log(`browser warnings (not failures):\n  ${warnings.join('\n  ')}`)
    check(errors.length === 0, `JavaScript errors:\n  ${errors.join('\n  ')}`)
    log(`passed: ${shot} screenshots in ${SHOTS}`)
  } catch (e) {
    if (page) await page.screenshot({ path: path.join(SHOTS, 'FAILED.png'), fullPage: true }).catch(() => {})
    if (errors.length) console.error(`JavaScript errors so far:\n  ${errors.join('\n  ')}`)
    throw e
  } finally {
    if (context) await context.close().catch(() => {})
    child.kill('SIGTERM')
    smtp.server.close()
    await sleep(500)
    fs.writeFileSync(path.join(SHOTS, 'server.log'), serverLog.join('\n') + '\n')
    fs.rmSync(tmp, { recursive: true, force: true })
  }
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(`\nUI test FAILED: ${e instanceof Failure ? e.message : e.stack || e}`)
    console.error(`(screenshots and server.log in ${SHOTS})`)
    process.exit(1)
  },
)

// The API client: bearer tokens kept in memory, silent refresh through the HttpOnly refresh
// cookie (`/api/auth/refresh`), one retry after a 401, and typed errors carrying the server's
// `{error, code}`.
import { reactive } from 'vue'

export class ApiError extends Error {
  constructor(status, message, code, body) {
    super(message)
    this.status = status
    this.code = code
    this.body = body
  }
}

// Set once a session exists in this browser, so a first visit does not ask the server to
// refresh a session that was never opened (that would only log a 401 in the console).
const HINT = 'ferrotune.session'

export const session = reactive({
  user: null,
  ready: false,
})

let accessToken = null
let refreshTimer = null
let refreshing = null
let onSignedOut = () => {}

/** Called with the current route when the session ends (expired, revoked, signed out). */
export function setSignedOutHandler(fn) {
  onSignedOut = fn
}

function adopt(body) {
  accessToken = body.access_token
  session.user = body.user
  try {
    localStorage.setItem(HINT, '1')
  } catch {
    /* storage may be disabled */
  }
  clearTimeout(refreshTimer)
  // Refresh a minute before the access token expires (at least after 10 s).
  const wait = Math.max(10, (body.expires_in || 3600) - 60) * 1000
  refreshTimer = setTimeout(() => {
    refresh().catch(() => {})
  }, wait)
}

function forget() {
  accessToken = null
  session.user = null
  clearTimeout(refreshTimer)
  try {
    localStorage.removeItem(HINT)
  } catch {
    /* storage may be disabled */
  }
}

async function errorFrom(res) {
  let body = null
  const text = await res.text().catch(() => '')
  try {
    body = JSON.parse(text)
  } catch {
    body = null
  }
  const message =
    (body && typeof body.error === 'string' && body.error) ||
    (body && body.error && body.error.message) ||
    text ||
    `${res.status} ${res.statusText}`
  const code = (body && (body.code || (body.error && body.error.code))) || ''
  const err = new ApiError(res.status, message, code, body)
  const retry = res.headers.get('retry-after')
  if (retry) err.retryAfter = Number(retry)
  return err
}

async function doRefresh() {
  const res = await fetch('/api/auth/refresh', {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'content-type': 'application/json' },
    body: '{}',
  })
  if (!res.ok) {
    expire()
    return false
  }
  adopt(await res.json())
  return true
}

/** The session ended without the user asking: forget it and send them to sign in. */
function expire() {
  const had = session.user !== null
  forget()
  if (had) onSignedOut()
}

/**
 * Exchanges the refresh cookie for a new access token. One refresh at a time, across tabs too
 * (the server revokes a session whose rotated refresh token is presented twice).
 */
export function refresh() {
  if (!refreshing) {
    const run = () => doRefresh().catch(() => false)
    const locked =
      typeof navigator !== 'undefined' && navigator.locks
        ? navigator.locks.request('ferrotune-refresh', run)
        : run()
    refreshing = locked.finally(() => {
      refreshing = null
    })
  }
  return refreshing
}

/** Restores the session at start-up, when this browser had one. */
export async function restore() {
  let hinted = false
  try {
    hinted = localStorage.getItem(HINT) === '1'
  } catch {
    hinted = false
  }
  if (hinted) await refresh()
  session.ready = true
}

export async function login(usernameOrEmail, password, rememberMe) {
  const res = await fetch('/api/auth/login', {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ username_or_email: usernameOrEmail, password, remember_me: !!rememberMe }),
  })
  if (!res.ok) throw await errorFrom(res)
  adopt(await res.json())
  return session.user
}

export async function register(username, email, password) {
  return request('/api/auth/register', { method: 'POST', json: { username, email, password }, anonymous: true })
}

/** Changes the password; the answer is a new session (every other one has ended). */
export async function changePassword(currentPassword, newPassword) {
  adopt(await request('/api/auth/password', { method: 'POST', json: { current_password: currentPassword, new_password: newPassword } }))
}

export async function logout() {
  try {
    if (accessToken) await request('/api/auth/logout', { method: 'POST', json: {} })
  } catch {
    /* signed out locally regardless */
  }
  forget()
}

/** Headers for a request made outside `request` (streams). */
export function authHeaders(extra = {}) {
  return accessToken ? { ...extra, authorization: `Bearer ${accessToken}` } : { ...extra }
}

/**
 * fetch with the access token; refreshes and retries once on 401. Throws ApiError on non-2xx.
 * Returns the Response when `raw`, else the parsed JSON (or text for non-JSON bodies).
 */
export async function request(path, opts = {}) {
  const { method = 'GET', json, body, headers = {}, raw = false, signal, anonymous = false } = opts
  const send = () => {
    const h = anonymous ? { ...headers } : authHeaders(headers)
    let payload = body
    if (json !== undefined) {
      h['content-type'] = 'application/json'
      payload = JSON.stringify(json)
    }
    return fetch(path, { method, headers: h, body: payload, signal, credentials: 'same-origin' })
  }
  let res = await send()
  if (res.status === 401 && !anonymous) {
    if (await refresh()) {
      res = await send()
    }
    if (res.status === 401) {
      expire()
      throw await errorFrom(res)
    }
  }
  if (!res.ok) throw await errorFrom(res)
  if (raw) return res
  const type = res.headers.get('content-type') || ''
  if (type.includes('application/json')) return res.json()
  return res.text()
}

export const get = (path, opts) => request(path, opts)
export const post = (path, json, opts = {}) => request(path, { ...opts, method: 'POST', json })
export const patch = (path, json, opts = {}) => request(path, { ...opts, method: 'PATCH', json })
export const del = (path, opts = {}) => request(path, { ...opts, method: 'DELETE' })

/** Downloads an authenticated resource as a file (the name from Content-Disposition). */
export async function download(path, fallbackName) {
  const res = await request(path, { raw: true })
  const blob = await res.blob()
  const cd = res.headers.get('content-disposition') || ''
  let name = fallbackName
  const star = /filename\*=UTF-8''([^;]+)/i.exec(cd)
  const plain = /filename="([^"]+)"/i.exec(cd)
  if (star) name = decodeURIComponent(star[1])
  else if (plain) name = plain[1]
  saveBlob(blob, name)
}

export function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob)
  const a = document.createElement('a')
  a.href = url
  a.download = name
  document.body.appendChild(a)
  a.click()
  a.remove()
  setTimeout(() => URL.revokeObjectURL(url), 1000)
}

/**
 * Uploads a file as multipart field `file` with progress (XMLHttpRequest: fetch cannot report
 * upload progress). Resolves with the JSON reply; rejects with ApiError.
 */
export function upload(path, file, onProgress, fields = {}) {
  const attempt = () =>
    new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest()
      xhr.open('POST', path)
      if (accessToken) xhr.setRequestHeader('authorization', `Bearer ${accessToken}`)
      xhr.upload.onprogress = (e) => {
        if (e.lengthComputable && onProgress) onProgress(e.loaded / e.total)
      }
      xhr.onload = () => {
        let body = null
        try {
          body = JSON.parse(xhr.responseText)
        } catch {
          body = null
        }
        if (xhr.status >= 200 && xhr.status < 300) resolve(body)
        else {
          const msg = (body && body.error) || `${xhr.status} ${xhr.statusText}`
          reject(new ApiError(xhr.status, msg, (body && body.code) || '', body))
        }
      }
      xhr.onerror = () => reject(new ApiError(0, 'network error during the upload', 'network'))
      const form = new FormData()
      for (const [k, v] of Object.entries(fields)) if (v) form.append(k, v)
      form.append('file', file, file.name)
      xhr.send(form)
    })
  return attempt().catch(async (e) => {
    if (e.status === 401 && (await refresh())) return attempt()
    throw e
  })
}

/**
 * Reads a server-sent event stream from a fetch response body, calling `onEvent({id, event,
 * data})` for each event. Resolves when the stream ends.
 */
export async function readSse(res, onEvent) {
  const reader = res.body.getReader()
  const decoder = new TextDecoder()
  let buf = ''
  let id = null
  let event = ''
  let data = []
  for (;;) {
    const { value, done } = await reader.read()
    if (done) break
    buf += decoder.decode(value, { stream: true })
    let nl
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, '')
      buf = buf.slice(nl + 1)
      if (line === '') {
        if (data.length) onEvent({ id, event: event || 'message', data: data.join('\n') })
        id = null
        event = ''
        data = []
      } else if (line.startsWith(':')) {
        // comment (keep-alive)
      } else {
        const i = line.indexOf(':')
        const field = i < 0 ? line : line.slice(0, i)
        let val = i < 0 ? '' : line.slice(i + 1)
        if (val.startsWith(' ')) val = val.slice(1)
        if (field === 'data') data.push(val)
        else if (field === 'event') event = val
        else if (field === 'id') id = val
      }
    }
  }
}

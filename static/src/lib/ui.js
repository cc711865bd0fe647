// App-wide state that is not the session: toasts, the theme, confirmations, and the watcher
// that notifies when a task finishes.
import { reactive, ref } from 'vue'
import { authHeaders, get, readSse, refresh, saveBlob, session } from './api.js'

// ---- toasts ---------------------------------------------------------------------------------

export const toasts = reactive([])
let nextToast = 1

export function toast(message, kind = 'info', ms = 5000) {
  const id = nextToast++
  toasts.push({ id, message, kind })
  if (ms > 0) setTimeout(() => dismiss(id), ms)
  return id
}

export function dismiss(id) {
  const i = toasts.findIndex((t) => t.id === id)
  if (i >= 0) toasts.splice(i, 1)
}

/** Shows an error from the API (or anything thrown) as a toast. */
export function showError(e, prefix = '') {
  const msg = e && e.message ? e.message : String(e)
  toast(prefix ? `${prefix}: ${msg}` : msg, 'error', 8000)
}

// ---- confirmation dialog ------------------------------------------------------------------

export const confirmState = reactive({ open: false, title: '', message: '', action: 'OK', danger: false, resolve: null })

/** A modal yes/no question; resolves true when confirmed. */
export function confirmAction(title, message, { action = 'OK', danger = false } = {}) {
  return new Promise((resolve) => {
    Object.assign(confirmState, { open: true, title, message, action, danger, resolve })
  })
}

export function answerConfirm(yes) {
  const r = confirmState.resolve
  confirmState.open = false
  confirmState.resolve = null
  if (r) r(yes)
}

// ---- theme ----------------------------------------------------------------------------------

const THEME = 'ferrotune.theme'
export const theme = ref('light')

export function initTheme() {
  let saved = null
  try {
    saved = localStorage.getItem(THEME)
  } catch {
    saved = null
  }
  const prefersDark = window.matchMedia && window.matchMedia('(prefers-color-scheme: dark)').matches
  setTheme(saved === 'dark' || saved === 'light' ? saved : prefersDark ? 'dark' : 'light', false)
}

export function setTheme(t, persist = true) {
  theme.value = t
  document.documentElement.dataset.theme = t
  if (persist) {
    try {
      localStorage.setItem(THEME, t)
    } catch {
      /* storage may be disabled */
    }
  }
}

// ---- task notifications ---------------------------------------------------------------------

export const notifications = reactive({
  supported: typeof window !== 'undefined' && 'Notification' in window,
  permission: typeof window !== 'undefined' && 'Notification' in window ? Notification.permission : 'denied',
})

export async function enableNotifications() {
  if (!notifications.supported) return
  notifications.permission = await Notification.requestPermission()
  if (notifications.permission === 'granted') toast('You will be notified when a task finishes or fails.', 'success')
}

let watchTimer = null
let notices = null
/** Latest task list, shared with pages that show it. */
export const taskFeed = reactive({ tasks: [], at: 0 })
/** Whether the notification stream is connected. */
export const noticeFeed = reactive({ live: false })

let onFinished = () => {}

async function pollTasks() {
  if (!session.user) return
  try {
    const { tasks } = await get('/api/tasks')
    taskFeed.tasks = tasks
    taskFeed.at = Date.now()
  } catch {
    /* the next poll tries again */
  }
}

const ENDED = { succeeded: 'completed', failed: 'failed', cancelled: 'cancelled' }

/** A notice from the server's stream: the list is re-read; an ending is announced. */
function onNotice({ event, data }) {
  if (event === 'lagged') return pollTasks()
  if (!event.startsWith('task.') && !event.startsWith('evaluation.')) return
  pollTasks()
  let body = null
  try {
    body = JSON.parse(data).data
  } catch {
    return
  }
  const status = ENDED[event.split('.')[1]]
  if (status && body) onFinished({ task_id: body.task_id || body.evaluation_id, name: body.name, model_name: body.model_name, status, evaluation: event.startsWith('evaluation.') })
}

/** Holds `/api/notifications` open (reconnecting) until stopped. */
async function followNotices(controller) {
  while (!controller.signal.aborted && session.user) {
    try {
      let res = await fetch('/api/notifications', { headers: authHeaders({ accept: 'text/event-stream' }), signal: controller.signal })
      if (res.status === 401 && (await refresh())) {
        res = await fetch('/api/notifications', { headers: authHeaders({ accept: 'text/event-stream' }), signal: controller.signal })
      }
      if (res.ok) {
        noticeFeed.live = true
        // Whatever ended while the stream was down shows in the list.
        pollTasks()
        await readSse(res, onNotice)
      }
    } catch {
      /* reconnect below */
    }
    noticeFeed.live = false
    if (controller.signal.aborted) return
    await new Promise((r) => setTimeout(r, 2000))
  }
}

/**
 * Keeps the shared task list fresh (re-read on every notice, and every few seconds for the
 * progress of running tasks) and announces — as a toast, and as a browser notification when
 * allowed — each of the user's tasks and evaluations that ends, from the server's
 * notification stream (the same events as webhooks), not by comparing polls.
 */
export function startTaskWatcher(openTask) {
  stopTaskWatcher()
  onFinished = (t) => {
    const verb = t.status === 'completed' ? 'finished' : t.status === 'failed' ? 'failed' : 'was cancelled'
    const what = t.evaluation ? 'Evaluation' : 'Task'
    toast(`${what} “${t.name}” ${verb}.`, t.status === 'completed' ? 'success' : t.status === 'failed' ? 'error' : 'info', 8000)
    if (notifications.supported && Notification.permission === 'granted') {
      try {
        const n = new Notification(`ferrotune: ${t.name} ${verb}`, {
          body: t.status === 'failed' ? 'Open the task to read the diagnosis.' : `Model ${t.model_name}`,
          tag: `task-${t.task_id}`,
        })
        n.onclick = () => {
          window.focus()
          openTask(t.task_id)
        }
      } catch {
        /* some browsers only allow notifications from a service worker */
      }
    }
  }
  pollTasks()
  watchTimer = setInterval(pollTasks, 4000)
  notices = new AbortController()
  followNotices(notices)
}

export function stopTaskWatcher() {
  clearInterval(watchTimer)
  watchTimer = null
  if (notices) notices.abort()
  notices = null
  noticeFeed.live = false
  taskFeed.tasks = []
}

/** Refreshes the shared task list now (after submitting, cancelling…). */
export function refreshTasks() {
  return pollTasks()
}

/** Saves text as a downloaded file. */
export function saveText(text, name, type = 'text/plain') {
  saveBlob(new Blob([text], { type }), name)
}

import { createRouter, createWebHistory } from 'vue-router'
import { restore, session } from './lib/api.js'

const routes = [
  { path: '/login', name: 'login', component: () => import('./pages/AuthPage.vue'), meta: { public: true, title: 'Sign in' } },
  { path: '/', name: 'dashboard', component: () => import('./pages/DashboardPage.vue'), meta: { title: 'Dashboard' } },
  { path: '/datasets', name: 'datasets', component: () => import('./pages/DatasetsPage.vue'), meta: { title: 'Datasets' } },
  { path: '/tasks', name: 'tasks', component: () => import('./pages/TasksPage.vue'), meta: { title: 'Tasks' } },
  { path: '/tasks/new', name: 'new-task', component: () => import('./pages/NewTaskPage.vue'), meta: { title: 'New task' } },
  { path: '/tasks/compare', name: 'compare', component: () => import('./pages/ComparePage.vue'), meta: { title: 'Compare runs', wide: true } },
  { path: '/tasks/:id', name: 'task', component: () => import('./pages/TaskPage.vue'), meta: { title: 'Task' } },
  { path: '/evaluations', name: 'evaluations', component: () => import('./pages/EvaluationsPage.vue'), meta: { title: 'Evaluations', wide: true } },
  { path: '/models', name: 'models', component: () => import('./pages/ModelsPage.vue'), meta: { title: 'Models' } },
  { path: '/chat', name: 'chat', component: () => import('./pages/ChatPage.vue'), meta: { title: 'Chat', wide: true } },
  { path: '/keys', name: 'keys', component: () => import('./pages/KeysPage.vue'), meta: { title: 'Account and API keys' } },
  { path: '/activity', name: 'activity', component: () => import('./pages/ActivityPage.vue'), meta: { title: 'Activity', wide: true } },
  { path: '/docs', name: 'docs', component: () => import('./pages/DocsPage.vue'), meta: { public: true, title: 'API reference', wide: true } },
  { path: '/logs', name: 'logs', component: () => import('./pages/LogsPage.vue'), meta: { title: 'Server log', wide: true, admin: true } },
  { path: '/admin', name: 'admin', component: () => import('./pages/AdminPage.vue'), meta: { title: 'Administration', admin: true } },
  { path: '/:rest(.*)*', name: 'not-found', component: () => import('./pages/NotFoundPage.vue'), meta: { title: 'Not found' } },
]

export const router = createRouter({
  history: createWebHistory(),
  routes,
  scrollBehavior: () => ({ top: 0 }),
})

/** Where to go after signing in: a path inside the app, never another site. */
export function safeNext(next) {
  return typeof next === 'string' && next.startsWith('/') && !next.startsWith('//') ? next : { name: 'dashboard' }
}

router.beforeEach(async (to) => {
  if (!session.ready) await restore()
  if (to.meta.public) {
    if (to.name === 'login' && session.user) return safeNext(to.query.next)
    return true
  }
  if (!session.user) return { name: 'login', query: to.fullPath === '/' ? {} : { next: to.fullPath } }
  if (to.meta.admin && session.user.role !== 'admin') return { name: 'dashboard' }
  return true
})

router.afterEach((to) => {
  document.title = to.meta.title ? `${to.meta.title} · ferrotune` : 'ferrotune'
})

import { createApp } from 'vue'
import App from './App.vue'
import { router } from './router.js'
import { setSignedOutHandler } from './lib/api.js'
import { initTheme, toast } from './lib/ui.js'
import './styles.css'

initTheme()
setSignedOutHandler(() => {
  const here = router.currentRoute.value
  if (here.meta.public) return
  toast('Your session has ended. Please sign in again.', 'info')
  router.push({ name: 'login', query: { next: here.fullPath } })
})

createApp(App).use(router).mount('#app')

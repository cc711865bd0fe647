// Builds the UI into `dist/` (or $FERROTUNE_UI_OUT, which build.rs sets to a folder under
// cargo's OUT_DIR). `npm run dev` serves it with hot reload and forwards the API to a running
// server ($FERROTUNE_API, default http://127.0.0.1:8080).
import { defineConfig } from 'vite'
import vue from '@vitejs/plugin-vue'

const api = process.env.FERROTUNE_API || 'http://127.0.0.1:8080'

export default defineConfig({
  plugins: [vue()],
  build: {
    outDir: process.env.FERROTUNE_UI_OUT || 'dist',
    emptyOutDir: true,
    target: 'es2020',
    assetsInlineLimit: 0,
    chunkSizeWarningLimit: 400,
    reportCompressedSize: false,
  },
  server: {
    proxy: {
      '/api': { target: api, ws: true },
      '/v1': api,
      '/health': api,
    },
  },
})

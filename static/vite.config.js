// Builds the UI into `dist/` (or $FERROTUNE_UI_OUT, which build.rs sets to a folder under
// cargo's OUT_DIR). `npm run dev` serves it with hot reload and forwards the API to a running
// server ($FERROTUNE_API, default http://127.0.0.1:8080).
import { defineConfig } from 'vite'
import vue from '@vitejs/plugin-vue'

const api = process.env.FERROTUNE_API || 'http://127.0.0.1:8080'

export default defineConfig({
  // <rapi-doc> (the API reference page) is a web component, not a Vue component.
  plugins: [vue({ template: { compilerOptions: { isCustomElement: (tag) => tag === 'rapi-doc' } } })],
  build: {
    outDir: process.env.FERROTUNE_UI_OUT || 'dist',
    emptyOutDir: true,
    target: 'es2020',
    assetsInlineLimit: 0,
    // The API reference (RapiDoc, ~860 KB, loaded only by /docs) is one chunk.
    chunkSizeWarningLimit: 1000,
    reportCompressedSize: false,
  },
  server: {
    proxy: {
      '/api': { target: api, ws: true },
      '/v1': api,
      '/health': api,
      '/openapi.json': api,
    },
  },
})

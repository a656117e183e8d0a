import { defineConfig } from 'vite';

// The dashboard is embedded in `ci` and served with a CSP that allows no
// inline script: no module-preload polyfill (it would be inlined), and
// assets named by content so the server may cache them forever.
export default defineConfig({
  base: '/',
  build: {
    outDir: 'dist',
    modulePreload: { polyfill: false },
    assetsInlineLimit: 0,
    sourcemap: false,
    target: 'es2022',
  },
  server: {
    proxy: { '/api': process.env.STRATA_API ?? 'http://127.0.0.1:8080' },
  },
});

// Runs a wasm32-wasip1 program in Node's V8 (the engine workerd embeds), passing the rest
// of the command line as its arguments: bash scripts/bench.sh runs the call core's
// benchmark this way (benches/wasm), so its per-frame figures in wasm sit next to the
// native ones.
//   node --no-warnings bench/wasi.mjs <program.wasm> [args…]
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';

const [file, ...args] = process.argv.slice(2);
if (!file) {
  console.error('usage: node bench/wasi.mjs <program.wasm> [args…]');
  process.exit(2);
}
const wasi = new WASI({ version: 'preview1', args: [file, ...args], env: {}, returnOnExit: true });
const module = await WebAssembly.compile(await readFile(file));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
process.exitCode = wasi.start(instance);

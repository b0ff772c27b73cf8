/**
 * Builds the ambassador as a Node single executable application (SEA): a CommonJS bundle, a
 * preparation blob, a copy of this machine's `node` with the blob injected (postject), stripped.
 * Everything here works offline.
 *
 *   npm run sea     →  bin/ambassador-node
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, mkdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, path.basename(path.dirname(here)) === 'dist' ? '../..' : '..');
const bin = path.join(root, 'bin');
const out = path.join(bin, 'ambassador-node');
const run = (cmd: string, args: string[]) => execFileSync(cmd, args, { cwd: root, stdio: 'inherit' });

mkdirSync(bin, { recursive: true });
run(path.join(root, 'node_modules', '.bin', 'esbuild'), ['ambassador.ts', '--bundle', '--platform=node', '--format=cjs', '--target=node20',
  '--minify-syntax', '--log-level=error', '--outfile=dist/ambassador.cjs',
  // A single executable cannot import(); builtins are require()d instead.
  '--supported:dynamic-import=false']);
writeFileSync(path.join(root, 'dist', 'sea-config.json'), JSON.stringify({
  main: 'dist/ambassador.cjs',
  output: 'dist/ambassador.blob',
  disableExperimentalSEAWarning: true,
  useCodeCache: true, // compiled once here, not at every start
}));
run(process.execPath, ['--experimental-sea-config', 'dist/sea-config.json']);
// Unlinked first: a copy of the previous binary that is still running keeps its own file.
rmSync(out, { force: true });
copyFileSync(process.execPath, out);
chmodSync(out, 0o755);
try {
  run('strip', [out]); // the debug symbols are most of node's size
} catch {
  console.warn('build-sea: `strip` not found (binutils); the executable keeps its symbols');
}
run(path.join(root, 'node_modules', '.bin', 'postject'), [out, 'NODE_SEA_BLOB', 'dist/ambassador.blob',
  '--sentinel-fuse', 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2']);
console.log(`build-sea: ${path.relative(root, out)} (${(statSync(out).size / 1024 / 1024).toFixed(1)} MiB)`);

/**
 * Builds the ambassador as a Node single executable application (SEA): a CommonJS bundle, a
 * preparation blob, a copy of this machine's `node` with the blob injected (postject), stripped.
 * Everything here works offline.
 *
 *   npm run sea     →  bin/ambassador-node
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, mkdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { shippedNode } from './node.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, path.basename(path.dirname(here)) === 'dist' ? '../..' : '..');
const bin = path.join(root, 'bin');
const out = path.join(bin, 'ambassador-node');
const run = (cmd: string, args: string[]) => execFileSync(cmd, args, { cwd: root, stdio: 'inherit' });

mkdirSync(bin, { recursive: true });
run(path.join(root, 'node_modules', '.bin', 'esbuild'), [
  'ambassador.ts',
  '--bundle',
  '--platform=node',
  '--format=cjs',
  '--target=node22',
  '--minify-syntax',
  '--log-level=error',
  '--outfile=dist/ambassador.cjs',
  // A single executable cannot import(); builtins are require()d instead.
  '--supported:dynamic-import=false',
]);
writeFileSync(
  path.join(root, 'dist', 'sea-config.json'),
  JSON.stringify({
    main: 'dist/ambassador.cjs',
    output: 'dist/ambassador.blob',
    disableExperimentalSEAWarning: true,
    useCodeCache: true, // compiled once here, not at every start
  }),
);
// From the Node the project ships (Node 24, scripts/node.ts): the blob must come from the same binary.
const node = shippedNode(root);
run(node, ['--experimental-sea-config', 'dist/sea-config.json']);
// Unlinked first: a copy of the previous binary that is still running keeps its own file.
rmSync(out, { force: true });
copyFileSync(node, out);
chmodSync(out, 0o755);
try {
  // The debug symbols are most of node's size. strip warns once per note section it does not know
  // ("Can't find string offset for section name '.note.100'"): harmless, so only other lines are shown.
  const stripped = spawnSync('strip', [out], { encoding: 'utf8' });
  if (stripped.error) throw stripped.error;
  const said = stripped.stderr.split('\n').filter((l) =>
    l.trim() && !/Can't find string offset for section name/.test(l)
  );
  if (said.length) console.warn(said.join('\n'));
  if (stripped.status !== 0) throw new Error(`strip exited ${stripped.status}`);
} catch (err) {
  console.warn(
    `build-sea: could not strip the executable (${(err as Error).message}; strip is in binutils); it keeps its symbols`,
  );
}
// postject (LIEF) warns the same of the note sections it rewrites: only its other lines are shown.
const injected = spawnSync(path.join(root, 'node_modules', '.bin', 'postject'), [
  out,
  'NODE_SEA_BLOB',
  'dist/ambassador.blob',
  '--sentinel-fuse',
  'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2',
], { cwd: root, encoding: 'utf8' });
const quiet = (text: string) =>
  text.split('\n').filter((l) => l.trim() && !/Can't find string offset for section name|Injection done/.test(l)).join(
    '\n',
  );
if (quiet(injected.stdout + injected.stderr)) console.warn(quiet(injected.stdout + injected.stderr));
if (injected.status !== 0) throw new Error(`postject failed (exit ${injected.status})`);
console.log(`build-sea: ${path.relative(root, out)} (${(statSync(out).size / 1024 / 1024).toFixed(1)} MiB)`);

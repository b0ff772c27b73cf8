/** `ambassador.ts` copied alone into an empty project, as the README's "Copy it into your project" says, on
 * each runtime: Node 24 (which runs TypeScript by stripping types), Deno and Bun. `hono`, its one package, is
 * installed from a tarball packed from this project's own node_modules, so the test needs no network;
 * everything else is the README's steps as written. */
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BUN, DENO, NODE, ROOT, startProcess, startUpstream, stopAfterEach } from './helpers.ts';

const dir = mkdtempSync(path.join(os.tmpdir(), 'ambassador-copy-'));
let hono = '';
beforeAll(() => {
  const packed = path.join(dir, 'packed');
  execFileSync('mkdir', ['-p', packed]);
  hono = path.join(
    packed,
    execFileSync('npm', ['pack', '--silent', '--pack-destination', packed, path.join(ROOT, 'node_modules', 'hono')], {
      encoding: 'utf8',
    }).trim().split('\n').pop()!,
  );
}, 120_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** An empty project with `ambassador.ts` copied in and the README's packages installed. */
function project(name: string, packages: string[]): string {
  const p = path.join(dir, name);
  execFileSync('mkdir', ['-p', p]);
  copyFileSync(path.join(ROOT, 'ambassador.ts'), path.join(p, 'ambassador.ts'));
  // `npm init -y` writes "type": "commonjs" (npm 11); the file is an ES module.
  writeFileSync(path.join(p, 'package.json'), JSON.stringify({ name, private: true, type: 'module' }));
  execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund', '--silent', ...packages], {
    cwd: p,
    stdio: 'pipe',
  });
  return p;
}

const runs: Array<[string, (p: string) => string[]]> = [
  ['Node 24: node ambassador.ts', () => [NODE, 'ambassador.ts']],
  [
    'Deno: deno run ambassador.ts',
    () => [
      DENO,
      'run',
      '--quiet',
      '--allow-net',
      '--allow-env',
      '--allow-read',
      '--unstable-no-legacy-abort',
      'ambassador.ts',
    ],
  ],
  ['Bun: bun ambassador.ts', () => [BUN, 'ambassador.ts']],
];

describe('the file copied alone into a project', () => {
  stopAfterEach();

  it.each(runs)('%s forwards a request', async (name, argv) => {
    const slug = name.split(':')[0].toLowerCase().replace(/\W+/g, '-');
    const p = project(slug, [hono]); // on Node too: its server is node:http's, with no adapter package
    const upstream = await startUpstream((q, res) => res.end(`upstream saw ${q.url}`));
    const amb = startProcess(['sh', '-c', `cd ${JSON.stringify(p)} && exec "$@"`, 'sh', ...argv(p)], {
      UPSTREAM_URL: upstream.url,
      PORT: '0',
      ADMIN_PORT: '0',
      ADMIN_HOST: '127.0.0.1',
    });
    try {
      const line = await amb.waitForLine((l) => l.includes('"msg":"listening"'), 30_000);
      const port = Number(/"port":(\d+)/.exec(line)?.[1]);
      const res = await fetch(`http://127.0.0.1:${port}/hello?x=1`);
      expect(await res.text()).toBe('upstream saw /hello?x=1');
      expect(amb.stderr.join('\n')).not.toMatch(/error/i);
    } finally {
      amb.kill('SIGKILL');
      await amb.exited;
    }
  }, 120_000);
});

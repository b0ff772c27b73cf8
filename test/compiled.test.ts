/** `deno task compile`: one executable from the bundle. `deno compile` needs Deno's `denort` runtime,
 * which it downloads; where that cannot happen (no network to Deno's host, no DENORT_BIN), this test
 * says so loudly and skips. Where it can, the executable proves itself on a real upstream. */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BUNDLE, deadPort, DENO, ROOT, skippedBecause, startProcess, startUpstream } from './helpers.ts';

const dir = mkdtempSync(path.join(os.tmpdir(), 'ambassador-compile-'));
const binary = path.join(dir, 'ambassador');
// The same command as `deno task compile`, into a temporary folder.
const compile = spawnSync(DENO, [
  'compile',
  '--no-config',
  '--allow-net',
  '--allow-env',
  '--allow-read',
  '--output',
  binary,
  BUNDLE,
], {
  cwd: ROOT,
  encoding: 'utf8',
  timeout: 120_000,
  env: { ...process.env, DENO_NO_UPDATE_CHECK: '1', NO_COLOR: '1' },
});
const compiled = compile.status === 0 && existsSync(binary);
let reason = '';
if (!compiled) {
  reason = (compile.stderr || compile.stdout || String(compile.error)).split('\n').filter((l) =>
    /error|dns|denort|download/i.test(l)
  ).slice(0, 3).join(' | ');
}

describe.skipIf(!compiled)(
  skippedBecause(
    'the deno-compiled binary',
    compiled
      ? undefined
      : `deno compile could not get its denort runtime here (${
        reason.trim() || 'unknown failure'
      }); set DENORT_BIN to a denort binary, or run where Deno's download host is reachable`,
  ),
  () => {
    afterAll(() => rmSync(dir, { recursive: true, force: true }));

    it('proxies, retries and drains like the source', async () => {
      console.log(`compiled binary: ${(statSync(binary).size / 1024 / 1024).toFixed(1)} MiB`);
      const upstream = await startUpstream((_q, res, _s, n) => {
        res.writeHead(n === 1 ? 503 : 200);
        res.end('from upstream');
      });
      const amb = startProcess([binary], {
        UPSTREAM_URL: upstream.url,
        PORT: '0',
        ADMIN_PORT: String(await deadPort()),
        RETRY_BACKOFF_MS: '0',
      });
      try {
        const line = await amb.waitForLine((l) => l.includes('"msg":"listening"'));
        const { port } = JSON.parse(line) as { port: number };
        const res = await fetch(`http://127.0.0.1:${port}/x`);
        expect(await res.text()).toBe('from upstream');
        expect(upstream.seen.length).toBe(2);
        amb.kill('SIGTERM');
        expect((await amb.exited).code).toBe(0);
      } finally {
        amb.kill('SIGKILL');
        await upstream.close();
      }
    });
  },
);

if (!compiled) rmSync(dir, { recursive: true, force: true });

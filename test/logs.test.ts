/** The access log: one line per request with stable field names, the request id in every line about a
 * request and no secrets (the text format: test/unit/logs.test.ts). */
import { describe, expect, it } from 'vitest';
import {
  ACCESS_LINE_KEYS,
  type AmbassadorProc,
  ARTIFACTS,
  memoryOf,
  startAmbassador,
  startUpstream,
  stopAfterEach,
  type Upstream,
} from './helpers.ts';

describe.each(ARTIFACTS)('logs (%s)', (runtime) => {
  let upstream: Upstream | undefined;
  let amb: AmbassadorProc | undefined;
  stopAfterEach();

  it('writes one JSON line per request with stable fields, and the id in every line about it', async () => {
    upstream = await startUpstream((_q, res, _s, n) => {
      res.writeHead(n === 1 ? 503 : 200);
      res.end('hello');
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    await (await fetch(`${amb.url}/path?token=secret-in-query`, {
      method: 'PUT',
      body: 'abc',
      headers: { 'x-request-id': 'rid-1' },
    })).text();
    const line = await amb.waitForLine((l) => l.includes('"msg":"request"'));
    const entry = JSON.parse(line);
    expect(Object.keys(entry)).toEqual(ACCESS_LINE_KEYS);
    expect(entry).toMatchObject({
      level: 'info',
      id: 'rid-1',
      method: 'PUT',
      path: '/path',
      status: 200,
      attempts: 2,
      bytes_in: 3,
      bytes_out: 5,
    });
    expect(entry.duration_ms).toBeGreaterThanOrEqual(entry.upstream_ms);
    const about = amb.logs().filter((l) => l.id === 'rid-1');
    expect(about.map((l) => String(l.msg).split(':')[0])).toEqual(['attempt 1 failed', 'request']);
    expect(amb.lines.join('\n')).not.toContain('secret-in-query');
  });

  it('counts every byte of the answer in bytes_out, a short body read whole or one streamed', async () => {
    upstream = await startUpstream((q, res) => {
      if (q.url === '/short') return res.end('hello'); // with its Content-Length: read whole (Deno and Bun)
      res.writeHead(200); // chunked: passed on as it comes
      res.write('he');
      setTimeout(() => res.end('llo!'), 20);
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    for (const [path, bytes] of [['/short', 5], ['/streamed', 6]] as const) {
      const res = await fetch(`${amb.url}${path}`);
      expect(res.headers.get('content-length')).toBe(path === '/short' ? '5' : null);
      expect((await res.text()).length).toBe(bytes);
      const line = await amb.waitForLine((l) => l.includes('"msg":"request"') && l.includes(`"path":"${path}"`));
      expect(JSON.parse(line).bytes_out).toBe(bytes);
    }
  });

  it('never writes credentials or cookies to the log or the admin port', async () => {
    upstream = await startUpstream((_q, res) => {
      res.writeHead(502);
      res.end();
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url, LOG_LEVEL: 'debug' });
    await (await fetch(`${amb.url}/x`, {
      headers: {
        authorization: 'Bearer sekrit-token',
        cookie: 'session=sekrit-cookie',
        'proxy-authorization': 'Basic sekrit-proxy',
      },
    })).text();
    await amb.waitForLine((l) => l.includes('"msg":"request"'));
    const admin = await (await fetch(`${amb.adminUrl}/metrics`)).text();
    for (const text of [amb.lines.join('\n'), amb.stderr.join('\n'), admin]) expect(text).not.toMatch(/sekrit/);
    expect(upstream.seen[0].headers.authorization).toBe('Bearer sekrit-token');
    expect(upstream.seen[0].headers['proxy-authorization']).toBeUndefined();
  });

  it('writes readable text lines with LOG_FORMAT=text, and only failures with LOG_LEVEL=warn', async () => {
    upstream = await startUpstream((q, res) => {
      res.writeHead(q.url === '/failing' ? 500 : 200);
      res.end();
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url, LOG_FORMAT: 'text', LOG_LEVEL: 'warn' });
    await (await fetch(`${amb.url}/quiet`)).text();
    await (await fetch(`${amb.url}/failing`)).text();
    expect(amb.lines.join('\n')).toMatch(/^\S+Z NOTICE listening version=0\.1\.0 runtime=\w+ port=\d+/m);
    // The failure's line is written; the quiet request's, sent before it, would have come first.
    const failing = await amb.waitForLine((l) => l.includes(' WARN ') && l.includes('path=/failing'));
    expect(failing).toMatch(/ WARN {3}request .*status=500/);
    expect(amb.lines.join('\n')).not.toContain('/quiet');
  });

  it('writes nothing to stderr while serving (no runtime notices)', async () => {
    upstream = await startUpstream();
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    for (let i = 0; i < 3; i++) await (await fetch(`${amb.url}/x${i}`)).text();
    // The last request's access-log line is out, so anything written to stderr while serving is too.
    await amb.waitForLine((l) => l.includes('"path":"/x2"'));
    expect(amb.stderr.join('\n')).toBe('');
  });
  it(
    'holds its log text to 1 MiB while nothing reads its stdout: answers on, drops and counts the lines past it, and says so once stdout is read again',
    async () => {
      upstream = await startUpstream();
      amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url, LOG_LEVEL: 'info' });
      amb.child.stdout!.pause(); // the pipe fills and stays full, as when a log collector stops reading
      const before = (await memoryOf(amb.pid)).rssMiB;
      // 6,000 requests with a 4,000-byte path: 24 MiB of access lines, none of which can go out.
      const path = `/${'a'.repeat(4000)}`;
      const statuses = new Map<number, number>();
      let next = 0;
      await Promise.all(Array.from({ length: 32 }, async () => {
        while (next++ < 6000) {
          const res = await fetch(`${amb!.url}${path}`, { signal: AbortSignal.timeout(10_000) });
          await res.arrayBuffer();
          statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
        }
      }));
      const grown = (await memoryOf(amb.pid)).rssMiB - before;
      const metrics = await (await fetch(`${amb.adminUrl}/metrics`)).text();
      const dropped = Number(/^ambassador_log_lines_dropped_total (\d+)$/m.exec(metrics)?.[1]);
      expect(Object.fromEntries(statuses)).toEqual({ 200: 6000 });
      // Read again, stdout gets the text that waited — at most 1 MiB (about 250 of these lines) besides what the
      // pipe held, not the 24 MiB — then one line that says how many were lost, then new lines.
      const seen = amb.lines.length;
      amb.child.stdout!.resume();
      const told = JSON.parse(await amb.waitForLine((l) => l.includes('log lines dropped')));
      const waited = amb.lines.slice(seen).reduce((sum, l) => sum + l.length + 1, 0);
      console.log(
        `log backlog (${runtime}): ${dropped} lines dropped, ${
          (waited / 1024).toFixed(0)
        } KiB written once read again, ` +
          `resident memory ${grown.toFixed(1)} MiB above what it was before the load`,
      );
      expect(dropped).toBeGreaterThan(5000);
      expect(waited).toBeLessThan(1.5 * 1024 * 1024);
      expect(told).toMatchObject({ level: 'warn', dropped });
      await (await fetch(`${amb.url}/after`)).text();
      await amb.waitForLine((l) => l.includes('"path":"/after"'));
    },
    60_000,
  );
  it('lives on when whatever reads its stdout goes away: every request answered, the lines that could not go out counted', async () => {
    upstream = await startUpstream();
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url, LOG_LEVEL: 'info' });
    amb.child.stdout!.destroy(); // the reader closes its end, as a log collector that exits or `| head` does
    const statuses: number[] = [];
    for (let i = 0; i < 50; i++) {
      const res = await fetch(`${amb.url}/x${i}`, { signal: AbortSignal.timeout(5_000) }).catch(() => undefined);
      statuses.push(res?.status ?? 0);
      await res?.arrayBuffer();
    }
    expect(statuses).toEqual(Array(50).fill(200));
    expect(amb.child.exitCode).toBe(null);
    const metrics = await (await fetch(`${amb.adminUrl}/metrics`)).text();
    expect(Number(/^ambassador_log_lines_dropped_total (\d+)$/m.exec(metrics)?.[1])).toBeGreaterThan(0);
  });
});

/** Hostile or broken input from the client side. Each gets a 4xx or a closed connection; nothing reaches
 * any host but the configured upstream, and no request is smuggled past the one the app sent; the
 * ambassador keeps serving throughout with bounded memory. */
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RUNTIMES, memoryOf, rawRequest, sleep, startAmbassador, startUpstream, type AmbassadorProc, type Upstream } from './helpers.ts';

const statusOf = (raw: string) => Number(/^HTTP\/1\.1 (\d{3})/.exec(raw)?.[1] ?? 0);

describe.each(RUNTIMES)('hostile input (%s)', (runtime) => {
  let upstream: Upstream;
  let amb: AmbassadorProc;
  let aborted = 0;
  beforeAll(async () => {
    upstream = await startUpstream((req, res) => {
      req.on('close', () => {
        if (!req.complete) aborted++;
      });
      req.on('end', () => res.end('fine'));
      req.resume();
    }, { readBody: false });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
  });
  afterAll(async () => {
    await amb?.stop();
    await upstream?.close();
  });
  const stillServing = async () => expect(await (await fetch(`${amb.url}/ok`)).text()).toBe('fine');

  it.each([
    ['Content-Length and Transfer-Encoding together', 'POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['two different Content-Lengths', 'POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcdeGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['obsolete line folding', 'GET /a HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n'],
    ['headers over 64 KiB', `GET /a HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(70_000)}\r\n\r\n`],
    ['a URL over 64 KiB', `GET /${'a'.repeat(70_000)} HTTP/1.1\r\nHost: x\r\n\r\n`],
    ['an invalid method', 'G@T /a HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['no Host header', 'GET /a HTTP/1.1\r\n\r\n'],
  ])('%s: a 4xx, nothing smuggled upstream', async (_name, text) => {
    const before = upstream.seen.length;
    const raw = await rawRequest(amb.port, text, 2000);
    const status = statusOf(raw);
    expect(status === 0 || (status >= 400 && status < 500), raw.slice(0, 80)).toBe(true);
    expect(upstream.seen.slice(before).some((s) => s.url.includes('smuggled'))).toBe(false);
    await stillServing();
  });

  it('bare LF line endings: refused, or read as one request (RFC 9112 §2.2 allows it) — never two', async () => {
    const before = upstream.seen.length;
    const raw = await rawRequest(amb.port, 'GET /a HTTP/1.1\nHost: x\nConnection: close\n\nGET /smuggled HTTP/1.1\nHost: x\n\n', 2000);
    const status = statusOf(raw);
    expect(status === 200 || (status >= 400 && status < 500)).toBe(true);
    expect(upstream.seen.slice(before).map((s) => s.url)).not.toContain('/smuggled');
    expect(upstream.seen.length - before).toBeLessThanOrEqual(1);
  });

  it('slow clients (slowloris) do not keep others waiting', async () => {
    const slow = Array.from({ length: 200 }, () => {
      const s = net.connect(amb.port, '127.0.0.1');
      s.on('error', () => {});
      s.write('GET /slow HTTP/1.1\r\nHost: x\r\nX-Drip: ');
      return s;
    });
    await sleep(200);
    for (const s of slow) s.write('a');
    const t0 = performance.now();
    for (let i = 0; i < 20; i++) await stillServing();
    expect(performance.now() - t0).toBeLessThan(2000);
    for (const s of slow) s.destroy();
  });

  it('a flood of 1000 idle connections: others are still served, memory stays bounded', async () => {
    const flood: net.Socket[] = [];
    for (let i = 0; i < 1000; i++) {
      const s = net.connect(amb.port, '127.0.0.1');
      s.on('error', () => {});
      flood.push(s);
    }
    await sleep(500);
    await stillServing();
    expect((await memoryOf(amb.pid)).rssMiB).toBeLessThan(250);
    for (const s of flood) s.destroy();
  });

  it('a client that vanishes mid-upload: the upstream request is aborted, the ambassador serves on', async () => {
    const before = aborted;
    const s = net.connect(amb.port, '127.0.0.1');
    s.on('error', () => {});
    s.write(`PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: ${1024 * 1024}\r\n\r\n`);
    s.write(Buffer.alloc(200 * 1024, 'u'));
    await sleep(300);
    s.destroy();
    for (let i = 0; i < 40 && aborted === before; i++) await sleep(50);
    expect(aborted).toBe(before + 1);
    await stillServing();
  });
});

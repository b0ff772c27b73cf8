/** Bodies are streamed both ways, never buffered whole; aborts travel from the app to the upstream. */
import http from 'node:http';
import { describe, expect, it } from 'vitest';
import { RUNTIMES, memoryOf, startAmbassador, startUpstream, type AmbassadorProc, type Upstream, stopAfterEach } from './helpers.ts';

const MiB = 1024 * 1024;

describe.each(RUNTIMES)('streaming (%s)', (runtime) => {
  let upstream: Upstream | undefined;
  let amb: AmbassadorProc | undefined;
  stopAfterEach();

  it('delivers server-sent events chunk by chunk, before the upstream has finished', async () => {
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    upstream = await startUpstream(async (_q, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
      res.write('data: first\n\n');
      await released; // the second event only once the app has seen the first
      res.end('data: second\n\n');
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    const res = await fetch(`${amb.url}/events`);
    const reader = res.body!.getReader();
    const first = await reader.read();
    expect(new TextDecoder().decode(first.value)).toBe('data: first\n\n');
    release();
    let rest = '';
    for (let r = await reader.read(); !r.done; r = await reader.read()) rest += new TextDecoder().decode(r.value);
    expect(rest).toBe('data: second\n\n');
  });

  it('streams an upload to the upstream before the app has finished sending it', async () => {
    let firstChunkAtUpstream!: (s: string) => void;
    const arrived = new Promise<string>((r) => (firstChunkAtUpstream = r));
    upstream = await startUpstream((req, res) => {
      let n = 0;
      req.on('data', (c: Buffer) => {
        if (n++ === 0) firstChunkAtUpstream(c.toString());
      });
      req.on('end', () => res.end(`chunks:${n}`));
    }, { readBody: false });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url, RETRY_BODY_MAX_BYTES: '0' });
    const req = http.request(`${amb.url}/upload`, { method: 'POST' });
    const response = new Promise<string>((resolve) => req.on('response', (r) => {
      let s = '';
      r.on('data', (c) => (s += c));
      r.on('end', () => resolve(s));
    }));
    req.write('part one;');
    expect(await arrived).toBe('part one;');
    req.end('part two');
    expect(await response).toMatch(/^chunks:\d+$/);
  });

  it('keeps sending an upload while the upstream already streams its answer back (full duplex)', async () => {
    // The upstream answers 200 at once and echoes each piece as it comes: an answer that is no refusal,
    // so the upload must go on to its end.
    upstream = await startUpstream((req, res) => {
      res.writeHead(200, { 'content-type': 'application/octet-stream' });
      req.on('data', (c: Buffer) => res.write(c));
      req.on('end', () => res.end());
    }, { readBody: false });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url, RETRY_BODY_MAX_BYTES: '0' });
    const pieces = 32;
    const echoed = await new Promise<number>((resolve, reject) => {
      const req = http.request(`${amb!.url}/echo`, { method: 'PUT', headers: { 'content-length': String(pieces * 16384) } }, (res) => {
        let n = 0;
        res.on('data', (c: Buffer) => (n += c.length));
        res.on('end', () => resolve(n));
      });
      req.on('error', reject);
      let sent = 0;
      const next = () => {
        if (sent++ === pieces) return req.end();
        req.write(Buffer.alloc(16384, 'e'));
        setTimeout(next, 5);
      };
      next();
    });
    expect(echoed).toBe(pieces * 16384);
  });

  it('passes a 1 GiB download and a 1 GiB upload in bounded memory', async () => {
    const chunk = Buffer.alloc(MiB, 'a');
    upstream = await startUpstream((req, res) => {
      if (req.method === 'PUT') {
        let total = 0;
        req.on('data', (c: Buffer) => (total += c.length));
        req.on('end', () => res.end(String(total)));
        return;
      }
      res.writeHead(200, { 'content-length': String(1024 * MiB) });
      let sent = 0;
      const pump = () => {
        while (sent < 1024) {
          sent++;
          if (!res.write(chunk)) return void res.once('drain', pump);
        }
        res.end();
      };
      pump();
    }, { readBody: false });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    const down = await fetch(`${amb.url}/big`);
    let received = 0;
    for await (const c of down.body!) received += (c as Uint8Array).byteLength;
    expect(received).toBe(1024 * MiB);

    let sent = 0;
    const source = new ReadableStream<Uint8Array>({
      pull(c) {
        if (sent++ < 1024) c.enqueue(chunk);
        else c.close();
      },
    });
    const up = await fetch(`${amb.url}/big`, { method: 'PUT', body: source, duplex: 'half' } as RequestInit);
    expect(await up.text()).toBe(String(1024 * MiB));
    const { peakMiB } = await memoryOf(amb.pid);
    // A whole body in memory would be over 1024 MiB; the runtime itself needs well under 200.
    expect(peakMiB).toBeLessThan(250);
  });

  it('cancels the upstream request when the app goes away while waiting for headers', async () => {
    let upstreamClosed!: () => void;
    const closed = new Promise<void>((r) => (upstreamClosed = r));
    upstream = await startUpstream((_q, res) => res.on('close', () => upstreamClosed()));
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    const ac = new AbortController();
    const pending = fetch(`${amb.url}/hang`, { signal: ac.signal }).catch((e: Error) => e.name);
    await new Promise((r) => setTimeout(r, 200));
    ac.abort();
    expect(await pending).toBe('AbortError');
    await closed; // the upstream saw its request end: hangs here (and times out) if it did not
    expect(upstream.seen.length).toBe(1);
  });

  it('cancels the upstream response when the app goes away mid-body', async () => {
    let upstreamClosed!: () => void;
    const closed = new Promise<void>((r) => (upstreamClosed = r));
    upstream = await startUpstream((_q, res) => {
      res.writeHead(200);
      res.write('start');
      res.on('close', () => upstreamClosed());
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    const ac = new AbortController();
    const res = await fetch(`${amb.url}/stream`, { signal: ac.signal });
    const reader = res.body!.getReader();
    await reader.read();
    ac.abort();
    await closed;
    await amb.waitForLine((l) => l.includes('"msg":"request"') && l.includes('/stream'));
  });

  it('breaks the response when the upstream dies mid-body, never a short body that looks complete', async () => {
    upstream = await startUpstream((_q, res) => {
      res.writeHead(200, { 'content-length': '100000' });
      res.write('x'.repeat(1000));
      setTimeout(() => res.socket?.destroy(), 50);
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    const res = await fetch(`${amb.url}/cut`);
    await expect(res.text()).rejects.toThrow();
  });
});

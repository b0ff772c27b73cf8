/** Transparent forwarding, against every runtime artifact: what the upstream receives and what the app
 * gets back, counted at a real upstream. */
import http from 'node:http';
import zlib from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RUNTIMES, rawRequest, startAmbassador, startUpstream, type AmbassadorProc, type Upstream } from './helpers.ts';

describe.each(RUNTIMES)('forwarding (%s)', (runtime) => {
  let upstream: Upstream;
  let amb: AmbassadorProc;
  beforeAll(async () => {
    upstream = await startUpstream((req, res, seen) => {
      if (req.url === '/base/gzip') {
        res.writeHead(200, { 'content-encoding': 'gzip', 'content-type': 'text/plain' });
        return res.end(zlib.gzipSync('compressed hello'));
      }
      if (req.url === '/base/hop') {
        res.writeHead(200, { connection: 'x-upstream-hop', 'x-upstream-hop': 'secret', 'keep-alive': 'timeout=1', 'x-kept': 'yes' });
        return res.end('hop');
      }
      if (req.url === '/base/nocontent') {
        res.writeHead(204);
        return res.end();
      }
      res.setHeader('content-type', 'application/json');
      res.setHeader('set-cookie', ['a=1', 'b=2']);
      res.end(JSON.stringify({ method: seen.method, url: seen.url, body: seen.body.toString() }));
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: `${upstream.url}/base` });
  });
  afterAll(async () => {
    await amb?.stop();
    await upstream?.close();
  });

  it('forwards method, path with its percent-encoding, query and body to the upstream base path', async () => {
    const res = await fetch(`${amb.url}/items/a%2Fb%20c?q=1&r=%26`, { method: 'PUT', body: 'payload' });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ method: 'PUT', url: '/base/items/a%2Fb%20c?q=1&r=%26', body: 'payload' });
    expect(res.headers.getSetCookie()).toEqual(['a=1', 'b=2']);
  });

  it('forwards any method fetch can send, including extension methods', async () => {
    const res = await fetch(`${amb.url}/x`, { method: 'PROPFIND' });
    expect((await res.json()).method).toBe('PROPFIND');
  });

  it('gives the upstream its own Host, X-Forwarded-*, Via and a request id, and keeps traceparent', async () => {
    const before = upstream.seen.length;
    const res = await fetch(`${amb.url}/h`, { headers: { traceparent: '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', tracestate: 'k=v' } });
    await res.text();
    const seen = upstream.seen[before];
    expect(seen.headers.host).toBe(`127.0.0.1:${upstream.port}`);
    expect(seen.headers['x-forwarded-for']).toBe('127.0.0.1');
    expect(seen.headers['x-forwarded-host']).toBe(`127.0.0.1:${amb.port}`);
    expect(seen.headers['x-forwarded-proto']).toBe('http');
    expect(seen.headers.via).toBe('1.1 ambassador');
    expect(seen.headers.traceparent).toBe('00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01');
    expect(seen.headers.tracestate).toBe('k=v');
    expect(seen.headers['x-request-id']).toMatch(/^[0-9a-f-]{36}$/);
    expect(res.headers.get('x-request-id')).toBe(seen.headers['x-request-id']);
  });

  it('passes an existing x-request-id on, and logs it', async () => {
    const before = upstream.seen.length;
    await (await fetch(`${amb.url}/rid`, { headers: { 'x-request-id': 'app-chose-this' } })).text();
    expect(upstream.seen[before].headers['x-request-id']).toBe('app-chose-this');
    await amb.waitForLine((l) => l.includes('"id":"app-chose-this"') && l.includes('"msg":"request"'));
  });

  it('removes hop-by-hop headers in both directions, including those named in Connection', async () => {
    const before = upstream.seen.length;
    const text = await rawRequest(amb.port, 'GET /hop HTTP/1.1\r\nHost: localhost\r\nConnection: close, x-app-hop\r\n' +
      'X-App-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eDp5\r\nX-App-Kept: yes\r\n\r\n');
    const seen = upstream.seen[before].headers;
    expect(seen['x-app-hop']).toBeUndefined();
    expect(seen['te']).toBeUndefined();
    expect(seen['proxy-authorization']).toBeUndefined();
    expect(seen['x-app-kept']).toBe('yes');
    const head = text.split('\r\n\r\n')[0].toLowerCase();
    expect(head).toContain('x-kept: yes');
    expect(head).not.toContain('x-upstream-hop');
    expect(head).not.toContain('timeout=1');
  });

  it('answers Expect: 100-continue uploads (what curl -T sends) and forwards the body', async () => {
    const before = upstream.seen.length;
    const body = 'x'.repeat(5000);
    const status = await new Promise<number>((resolve, reject) => {
      const req = http.request(`${amb.url}/upload`, { method: 'PUT', headers: { expect: '100-continue', 'content-length': body.length } });
      req.on('continue', () => req.end(body));
      req.on('response', (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.on('error', reject);
    });
    expect(status).toBe(200);
    expect(upstream.seen[before].body.toString()).toBe(body);
    expect(upstream.seen[before].headers.expect).toBeUndefined();
  });

  it('never hands the app a decoded body with the old content-encoding', async () => {
    const before = upstream.seen.length;
    const res = await fetch(`${amb.url}/gzip`, { headers: { 'accept-encoding': 'gzip' } });
    // fetch decodes gzip itself when the header says so: either way the text must be right.
    expect(await res.text()).toBe('compressed hello');
    expect(upstream.seen[before].headers['accept-encoding']).toBe('identity');
    const raw = await rawRequest(amb.port, 'GET /gzip HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
    const [head] = raw.split('\r\n\r\n');
    if (/content-encoding: gzip/i.test(head)) {
      // Passed through still compressed: the body must really be gzip.
      const body = Buffer.from(raw.slice(raw.indexOf('\r\n\r\n') + 4), 'latin1');
      const dechunked = /transfer-encoding: chunked/i.test(head) ? dechunk(body) : body;
      expect(zlib.gunzipSync(dechunked).toString()).toBe('compressed hello');
    } else {
      expect(raw).toContain('compressed hello');
      expect(head).not.toMatch(/content-length: (?!16\b)/i);
    }
  });

  it('answers a 204 with no body', async () => {
    const res = await fetch(`${amb.url}/nocontent`);
    expect(res.status).toBe(204);
    expect(await res.text()).toBe('');
  });

  it('refuses CONNECT, absolute-form targets to other hosts and TRACE, and sends nothing upstream for them', async () => {
    const before = upstream.seen.length;
    const connect = await rawRequest(amb.port, 'CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n', 1000);
    expect(connect).toMatch(/^HTTP\/1\.1 4\d\d/);
    const trace = await rawRequest(amb.port, 'TRACE / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
    expect(trace).toMatch(/^HTTP\/1\.1 405/);
    const absolute = await rawRequest(amb.port, 'GET http://example.com/steal HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
    expect(absolute).toMatch(/^HTTP\/1\.1 400/);
    expect(upstream.seen.length).toBe(before);
  });

  it('sends an absolute-form request to the upstream only, whatever host it names', async () => {
    const before = upstream.seen.length;
    const res = await rawRequest(amb.port, 'GET http://example.com/steal HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n');
    // Refused (Node sees the raw target) or forwarded to the configured upstream (Deno rewrites the target
    // to origin-form): never a connection to example.com.
    if (/^HTTP\/1\.1 400/.test(res)) expect(upstream.seen.length).toBe(before);
    else expect(upstream.seen[before].url).toBe('/base/steal');
  });

  it('answers readiness and liveness on the admin port, and nothing of the upstream there', async () => {
    expect((await fetch(`${amb.adminUrl}/healthz`)).status).toBe(200);
    expect((await fetch(`${amb.adminUrl}/readyz`)).status).toBe(200);
    expect((await fetch(`${amb.adminUrl}/items`)).status).toBe(404);
  });
});

function dechunk(buf: Buffer): Buffer {
  const out: Buffer[] = [];
  let at = 0;
  for (;;) {
    const eol = buf.indexOf('\r\n', at);
    const size = parseInt(buf.subarray(at, eol).toString(), 16);
    if (!size) return Buffer.concat(out);
    out.push(buf.subarray(eol + 2, eol + 2 + size));
    at = eol + 2 + size + 2;
  }
}

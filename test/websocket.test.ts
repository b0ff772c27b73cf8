/** WebSocket pass-through on every artifact, against a real WebSocket server (the `ws` package) and client:
 * the handshake is routed and retried like a GET, a 101 becomes a tunnel both ways, any other answer
 * reaches the app as it is; tunnels hold a place, are cut when idle, are counted and logged once, and are
 * closed with 1001 by the drain. Only `Upgrade: websocket` is tunnelled: an h2c upgrade goes on as a plain
 * request without it. */
import { spawnSync } from 'node:child_process';
import http from 'node:http';
import https from 'node:https';
import type net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket, { WebSocketServer } from 'ws';
import {
  ARTIFACTS,
  deadPort,
  onStop,
  rawRequest,
  routesFile,
  runtimeOf,
  scrape,
  skippedBecause,
  sleep,
  startAmbassador,
  startRawUpstream,
  stopAfterEach,
  waitFor,
} from './helpers.ts';
import { makePki, type Pki } from './pki.ts';

const hasOpenssl = spawnSync('sh', ['-c', 'command -v openssl']).status === 0;
let pki: Pki | undefined;
beforeAll(() => {
  if (hasOpenssl) pki = makePki();
});
afterAll(() => pki?.remove());

interface WsUpstream {
  url: string;
  port: number;
  /** the path and the headers of each handshake that reached it */
  handshakes: Array<{ path: string; headers: http.IncomingHttpHeaders }>;
  sockets: Set<WebSocket>;
}

/** A WebSocket upstream that echoes every message (`echo: <message>`) and picks `chat` when offered. A
 * handshake to `/deny` gets 401 with a body; one to `/slow` waits `slowMs` first. Over TLS with `tls`. */
async function wsUpstream(options: { tls?: boolean; deflate?: boolean } = {}): Promise<WsUpstream> {
  const server = options.tls
    ? https.createServer({ key: pki!.read('server.key'), cert: pki!.read('server.pem') })
    : http.createServer();
  server.on('request', (_req, res) => res.end('plain'));
  const handshakes: WsUpstream['handshakes'] = [];
  const sockets = new Set<WebSocket>();
  const wss = new WebSocketServer({
    noServer: true,
    perMessageDeflate: options.deflate ?? false,
    handleProtocols: (p) => (p.has('chat') ? 'chat' : false),
  });
  server.on('upgrade', (req, socket, head) => {
    handshakes.push({ path: req.url ?? '', headers: req.headers });
    if (req.url === '/deny') {
      socket.end('HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nno ticket\n');
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      sockets.add(ws);
      ws.on('close', () => sockets.delete(ws));
      ws.on('message', (data, binary) => ws.send(binary ? data : `echo: ${data}`, { binary }));
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  onStop(() =>
    new Promise<void>((r) => {
      for (const ws of sockets) ws.terminate();
      server.closeAllConnections();
      server.close(() => r());
    })
  );
  return { url: `${options.tls ? 'https' : 'http'}://127.0.0.1:${port}`, port, handshakes, sockets };
}

/** A client connected through the ambassador, and what it receives. */
async function connect(
  url: string,
  protocols: string[] = [],
  options: WebSocket.ClientOptions = {},
): Promise<{ ws: WebSocket; next(): Promise<string>; closed: Promise<{ code: number; reason: string }> }> {
  const ws = new WebSocket(url, protocols, options);
  const inbox: string[] = [];
  const waiting: Array<(m: string) => void> = [];
  ws.on('message', (data) => {
    const m = String(data);
    const w = waiting.shift();
    if (w) w(m);
    else inbox.push(m);
  });
  const closed = new Promise<{ code: number; reason: string }>((r) =>
    ws.on('close', (code, reason) => r({ code, reason: String(reason) }))
  );
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve());
    ws.once('error', reject);
    ws.once('unexpected-response', (_req, res) => reject(new Error(`handshake answered ${res.statusCode}`)));
  });
  onStop(async () => ws.terminate());
  const next = () => inbox.length > 0 ? Promise.resolve(inbox.shift()!) : new Promise<string>((r) => waiting.push(r));
  return { ws, next, closed };
}

/** What a handshake the upstream (or the ambassador) does not accept gets: its status, headers and body. */
function refusedHandshake(url: string): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.once('open', () => reject(new Error('the handshake was accepted')));
    ws.once('error', () => {});
    ws.once('unexpected-response', (_req, res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => {
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body });
        ws.terminate();
      });
    });
  });
}

const ws = (amb: { port: number }, path = '/') => `ws://127.0.0.1:${amb.port}${path}`;

describe.each(ARTIFACTS)('WebSocket pass-through (%s)', (artifact) => {
  stopAfterEach();

  it('echoes text and binary both ways, with the subprotocol the upstream chose, and logs the tunnel once', async () => {
    const upstream = await wsUpstream();
    const amb = await startAmbassador(artifact, { UPSTREAM_URL: upstream.url });
    const client = await connect(ws(amb, '/live?room=1'), ['chat', 'superchat']);
    expect(client.ws.protocol).toBe('chat');
    client.ws.send('hello');
    expect(await client.next()).toBe('echo: hello');
    const big = 'x'.repeat(200_000);
    client.ws.send(big);
    expect(await client.next()).toBe(`echo: ${big}`);
    client.ws.send(Buffer.from([0, 1, 2, 255]));
    expect(Buffer.from(await client.next(), 'latin1').length).toBeGreaterThan(0);
    expect(upstream.handshakes[0].path).toBe('/live?room=1');
    expect(upstream.handshakes[0].headers['sec-websocket-protocol']).toBe('chat,superchat');
    expect(upstream.handshakes[0].headers['x-forwarded-for']).toBe('127.0.0.1');

    let metrics = await scrape(amb);
    expect(metrics.get('ambassador_websocket_tunnels_open')).toBe(1);
    expect(metrics.get('ambassador_websocket_tunnels_total{route="default",outcome="opened"}')).toBe(1);
    client.ws.close(1000, 'done');
    expect((await client.closed).code).toBe(1000);
    const line = await amb.waitForLine((l) => l.includes('"status":101'));
    const logged = JSON.parse(line) as Record<string, number | string>;
    expect(logged.closed_by).toBe('app');
    expect(logged.bytes_in).toBeGreaterThan(200_000);
    expect(logged.bytes_out).toBeGreaterThan(200_000);
    await waitFor(
      'the tunnel counted closed',
      async () => (await scrape(amb)).get('ambassador_websocket_tunnels_open') === 0,
    );
    metrics = await scrape(amb);
    expect(metrics.get('ambassador_websocket_bytes_total{route="default",direction="to_app"}')).toBe(logged.bytes_out);
    expect(metrics.get('ambassador_websocket_bytes_total{route="default",direction="to_upstream"}')).toBe(
      logged.bytes_in,
    );
    expect(amb.logs().filter((l) => l.status === 101)).toHaveLength(1);
  });

  it('routes a handshake like a request: prefix taken off on a stripPrefix route', async () => {
    const upstream = await wsUpstream();
    const amb = await startAmbassador(artifact, {
      ROUTES_FILE: routesFile([{ name: 'prices', prefix: '/prices', stripPrefix: true, upstream: upstream.url }]),
    });
    const client = await connect(ws(amb, '/prices/stream?s=ABC'));
    client.ws.send('tick');
    expect(await client.next()).toBe('echo: tick');
    expect(upstream.handshakes.map((h) => h.path)).toEqual(['/stream?s=ABC']);
  });

  it('passes on a handshake the upstream refuses, as the upstream answered it', async () => {
    const upstream = await wsUpstream();
    const amb = await startAmbassador(artifact, { UPSTREAM_URL: upstream.url });
    const refused = await refusedHandshake(ws(amb, '/deny'));
    expect(refused.status).toBe(401);
    expect(refused.body).toBe('no ticket\n');
    await waitFor(
      'the refusal counted',
      async () =>
        (await scrape(amb)).get('ambassador_websocket_tunnels_total{route="default",outcome="refused"}') === 1,
    );
    // and the ambassador goes on carrying tunnels
    const client = await connect(ws(amb));
    client.ws.send('again');
    expect(await client.next()).toBe('echo: again');
  });

  it('retries a refused connection on another endpoint, and answers 503 with Retry-After once all are ejected', async () => {
    const upstream = await wsUpstream();
    const dead = await deadPort();
    const amb = await startAmbassador(artifact, {
      ROUTES_FILE: routesFile([{
        name: 'live',
        prefix: '/',
        upstream: [`http://127.0.0.1:${dead}`, upstream.url],
        breakerFailures: 1,
        breakerOpenMs: 60_000,
      }]),
    });
    // Until the dead endpoint has been picked once: its refusal is retried on the live one.
    for (let i = 0; !amb.logs().some((l) => l.kind === 'refused'); i++) {
      expect(i).toBeLessThan(20);
      const client = await connect(ws(amb));
      client.ws.send(`n${i}`);
      expect(await client.next()).toBe(`echo: n${i}`);
      client.ws.close();
    }
    expect(amb.logs().find((l) => l.kind === 'refused')?.retry_in_ms).toBeDefined();
    // With its only endpoint refusing: one handshake fails (502), and then the endpoint is ejected.
    const only = await startAmbassador(artifact, {
      UPSTREAM_URL: `http://127.0.0.1:${dead}`,
      BREAKER_FAILURES: '1',
      BREAKER_OPEN_MS: '60000',
      RETRY_ATTEMPTS: '1',
    });
    expect((await refusedHandshake(ws(only))).status).toBe(502);
    const ejected = await refusedHandshake(ws(only));
    expect(ejected.status).toBe(503);
    expect(Number(ejected.headers['retry-after'])).toBeGreaterThan(0);
  });

  it('carries 50 tunnels at once, each its own', async () => {
    const upstream = await wsUpstream();
    const amb = await startAmbassador(artifact, { UPSTREAM_URL: upstream.url });
    const clients = await Promise.all(Array.from({ length: 50 }, () => connect(ws(amb))));
    expect((await scrape(amb)).get('ambassador_websocket_tunnels_open')).toBe(50);
    clients.forEach((c, i) => c.ws.send(`client ${i}`));
    expect(await Promise.all(clients.map((c) => c.next()))).toEqual(clients.map((_c, i) => `echo: client ${i}`));
  });

  it('closes the app side when the upstream dies mid-tunnel, and nothing hangs', async () => {
    const upstream = await wsUpstream();
    const amb = await startAmbassador(artifact, { UPSTREAM_URL: upstream.url });
    const client = await connect(ws(amb));
    client.ws.send('one');
    expect(await client.next()).toBe('echo: one');
    for (const s of upstream.sockets) s.terminate(); // the connection dropped, no close frame
    const closed = await client.closed;
    expect(closed.code).not.toBe(1000);
    const line = JSON.parse(await amb.waitForLine((l) => l.includes('"status":101'))) as Record<string, unknown>;
    expect(line.closed_by).toBe('upstream');
    await waitFor('the tunnel gone', async () => (await scrape(amb)).get('ambassador_websocket_tunnels_open') === 0);
    expect((await scrape(amb)).get('ambassador_requests_in_flight')).toBe(0);
  });

  it('cuts a tunnel silent both ways for BODY_IDLE_TIMEOUT_MS, and holds a place under MAX_IN_FLIGHT', async () => {
    const upstream = await wsUpstream();
    const amb = await startAmbassador(artifact, {
      UPSTREAM_URL: upstream.url,
      BODY_IDLE_TIMEOUT_MS: '1500',
      MAX_IN_FLIGHT: '1',
      QUEUE_SIZE: '0',
    });
    const client = await connect(ws(amb));
    const started = Date.now();
    // Messages keep it open past the idle time...
    for (let i = 0; i < 4; i++) {
      await sleep(500);
      client.ws.send(`keep ${i}`);
      expect(await client.next()).toBe(`echo: keep ${i}`);
    }
    // ...while a second tunnel finds no place.
    const second = await refusedHandshake(ws(amb));
    expect(second.status).toBe(503);
    const closed = await client.closed;
    expect(Date.now() - started).toBeGreaterThan(2000 + 1400);
    expect(closed.code).toBe(1001);
    const line = JSON.parse(await amb.waitForLine((l) => l.includes('"status":101'))) as Record<string, unknown>;
    expect(line.closed_by).toBe('idle');
    // Its place is free again.
    const third = await connect(ws(amb));
    third.ws.send('free');
    expect(await third.next()).toBe('echo: free');
  });

  it('on SIGTERM takes no new tunnel, closes open ones with 1001 after the grace, and exits 0', async () => {
    const upstream = await wsUpstream();
    const amb = await startAmbassador(artifact, {
      UPSTREAM_URL: upstream.url,
      DRAIN_GRACE_MS: '1000',
      DRAIN_TIMEOUT_MS: '8000',
    });
    const clients = await Promise.all(Array.from({ length: 3 }, () => connect(ws(amb))));
    const upstreamClosed = [...upstream.sockets].map((s) =>
      new Promise<number>((r) => s.on('close', (code) => r(code)))
    );
    const signalled = Date.now();
    amb.kill('SIGTERM');
    await amb.waitForLine((l) => l.includes('drain started'));
    // Within the grace a new handshake is turned away, and the open tunnels still carry messages.
    const late = await refusedHandshake(ws(amb));
    expect(late.status).toBe(503);
    clients[0].ws.send('still here');
    expect(await clients[0].next()).toBe('echo: still here');
    const codes = await Promise.all(clients.map((c) => c.closed));
    expect(Date.now() - signalled).toBeGreaterThan(900);
    for (const c of codes) expect(c.code).toBe(1001);
    expect(await Promise.all(upstreamClosed)).toEqual([1001, 1001, 1001]);
    const exit = await amb.exited;
    expect(exit.code).toBe(0);
    expect(Date.now() - signalled).toBeLessThan(8000);
  });

  it('passes an agreed extension end to end on Node, and offers none upstream where it reads messages', async () => {
    const upstream = await wsUpstream({ deflate: true });
    const amb = await startAmbassador(artifact, { UPSTREAM_URL: upstream.url });
    const client = await connect(ws(amb), [], { perMessageDeflate: true });
    const text = 'compressible '.repeat(2000);
    client.ws.send(text);
    expect(await client.next()).toBe(`echo: ${text}`);
    const offered = upstream.handshakes[0].headers['sec-websocket-extensions'];
    if (runtimeOf(artifact) === 'node') {
      // Bytes pass untouched: the app and the upstream compress to each other.
      expect(offered).toContain('permessage-deflate');
      expect(client.ws.extensions).toContain('permessage-deflate');
    } else {
      // Deno, Bun: the ambassador reads each message, so no extension is offered upstream.
      expect(offered).toBeUndefined();
    }
  });

  it("refuses an upstream's 101 whose Sec-WebSocket-Accept does not match the app's key (502)", async () => {
    const raw = await startRawUpstream((_r, s) =>
      void s.write(
        'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
          'Sec-WebSocket-Accept: c2VjcmV0IHRoYXQgaXMgbm90IHRoZSBrZXk=\r\n\r\n',
      )
    );
    const amb = await startAmbassador(artifact, { UPSTREAM_URL: raw.url, RETRY_ATTEMPTS: '1' });
    const answer = await refusedHandshake(ws(amb));
    expect(answer.status).toBe(502);
    expect(answer.body).toContain('Sec-WebSocket-Accept does not match');
  });

  it('never tunnels an h2c upgrade: it goes on as a plain request without Upgrade', async () => {
    const raw = await startRawUpstream((_r, s) => void s.write('HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain'));
    const amb = await startAmbassador(artifact, { UPSTREAM_URL: raw.url });
    const answer = await rawRequest(
      amb.port,
      'GET /h2 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n',
      1500,
    );
    expect(answer).toMatch(/^HTTP\/1\.1 200 /);
    expect(answer).not.toMatch(/HTTP\/1\.1 101 /); // no switch, anywhere in what came back
    const sent = raw.requests[0].head.toLowerCase();
    expect(sent).not.toContain('upgrade');
    expect(sent).not.toContain('http2-settings');
  });

  it.skipIf(!hasOpenssl)(
    skippedBecause(
      "reaches a wss:// upstream with the route's CA",
      hasOpenssl ? undefined : 'openssl is not installed',
    ),
    async () => {
      const upstream = await wsUpstream({ tls: true });
      const amb = await startAmbassador(artifact, {
        UPSTREAM_URL: `https://localhost:${upstream.port}`,
        UPSTREAM_CA_FILE: pki!.file('upstream-ca.pem'),
      });
      const client = await connect(ws(amb, '/secure'));
      client.ws.send('over tls');
      expect(await client.next()).toBe('echo: over tls');
      // and one the CA does not vouch for is refused
      const other = await startAmbassador(artifact, {
        UPSTREAM_URL: `https://localhost:${upstream.port}`,
        UPSTREAM_CA_FILE: pki!.file('other-ca.pem'),
      });
      expect((await refusedHandshake(ws(other))).status).toBe(502);
    },
  );
});

/** Faults from the upstream, each from a real misbehaving server speaking raw TCP. For each, what the app
 * receives is well defined — a correct response, a clean 502/504, or a body that ends in an error, never a
 * short body that looks whole — retries follow the rules, and the ambassador keeps serving. */
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import http from 'node:http';
import {
  type AmbassadorProc,
  ARTIFACTS,
  rawRequest,
  runtimeOf,
  scrape,
  sleep,
  startAmbassador,
  startRawUpstream,
  startUpstream,
  stopAfterEach,
  waitFor,
} from './helpers.ts';

const OK = 'HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok';

/** One raw server, its behaviour chosen by the request path; counts requests per path. */
async function misbehavingUpstream() {
  const seen = new Map<string, number>();
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    let buffered = '';
    socket.on('data', (d) => {
      buffered += d.toString('latin1');
      while (buffered.includes('\r\n\r\n')) {
        const head = buffered.slice(0, buffered.indexOf('\r\n\r\n'));
        buffered = buffered.slice(buffered.indexOf('\r\n\r\n') + 4);
        const path = head.split(' ')[1] ?? '';
        seen.set(path, (seen.get(path) ?? 0) + 1);
        answer(path, socket, seen.get(path)!);
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    seen,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

function answer(path: string, socket: net.Socket, n: number): void {
  switch (path) {
    case '/ok':
      return void socket.write(OK);
    case '/silent':
      return; // accepts, reads, never answers
    case '/stall-body':
      return void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst part'); // then nothing
    case '/garbage':
      return void socket.end('SSH-2.0-OpenSSH_9.2 this is not HTTP\r\n\r\n');
    case '/too-long': // declares more than it sends, then closes
      return void socket.end('HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nonly this much');
    case '/too-short': // declares less than it sends
      return void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello, and then some extra bytes');
    case '/close-after': // a keep-alive response, then the connection closes under the next reuse
      socket.write(OK);
      return void setTimeout(() => socket.destroy(), 5);
    case '/byte-by-byte': {
      const text = 'HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\nslow but ok!';
      let i = 0;
      const timer = setInterval(() => {
        if (socket.destroyed || i >= text.length) return clearInterval(timer);
        socket.write(text[i++]);
      }, 2);
      return;
    }
    case '/interim':
      return void socket.write('HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n' + OK);
    case '/huge-headers':
      return void socket.write(`HTTP/1.1 200 OK\r\nx-huge: ${'a'.repeat(128 * 1024)}\r\ncontent-length: 2\r\n\r\nok`);
    case '/upgrade': // switches protocols though nobody asked (a WebSocket server that saw Sec-WebSocket-Key)
      return void socket.write('HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n');
    case '/te-and-cl': // both framing headers: a smuggling shape
      return void socket.write(
        'HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n',
      );
    case '/no-content':
      return void socket.write('HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n');
    case '/bad-reason-soh':
      return void socket.write('HTTP/1.1 200 O\x01K\r\ncontent-length: 2\r\n\r\nok');
    case '/bad-reason-del':
      return void socket.write('HTTP/1.1 200 O\x7fK\r\ncontent-length: 2\r\n\r\nok');
    case '/bad-reason-nul':
      return void socket.write('HTTP/1.1 200 O\x00K\r\ncontent-length: 2\r\n\r\nok');
    case '/gzip-chunked': // a transfer coding under the chunked framing, which the app would never be told of
      return void socket.write('HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n');
    case '/reset-first':
      if (n === 1) return void socket.resetAndDestroy();
      return void socket.write(OK);
    default:
      return void socket.write('HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n');
  }
}

describe.each(ARTIFACTS)('upstream faults (%s)', (runtime) => {
  let upstream: Awaited<ReturnType<typeof misbehavingUpstream>>;
  let amb: AmbassadorProc;
  beforeAll(async () => {
    upstream = await misbehavingUpstream();
    amb = await startAmbassador(runtime, {
      UPSTREAM_URL: upstream.url,
      TRY_TIMEOUT_MS: '300',
      REQUEST_TIMEOUT_MS: '1500',
      BODY_IDLE_TIMEOUT_MS: '500',
      RETRY_BACKOFF_MS: '0',
      RETRY_BACKOFF_MAX_MS: '0',
    });
  });
  afterAll(async () => {
    await amb?.stop();
    await upstream?.close();
  });
  const stillServing = async () => expect(await (await fetch(`${amb.url}/ok`)).text()).toBe('ok');

  it('accepts and never answers: 504 at REQUEST_TIMEOUT_MS, the deadline cutting the running try short', async () => {
    // Tries of 2000 ms against a 2200 ms deadline: the second try is cut to 200 ms, a third never starts.
    const own = await startAmbassador(runtime, {
      UPSTREAM_URL: upstream.url,
      TRY_TIMEOUT_MS: '2000',
      REQUEST_TIMEOUT_MS: '2200',
      RETRY_BACKOFF_MS: '0',
      RETRY_BACKOFF_MAX_MS: '0',
    });
    try {
      const before = upstream.seen.get('/silent') ?? 0;
      const t0 = performance.now();
      const res = await fetch(`${own.url}/silent`);
      const took = performance.now() - t0;
      expect(res.status).toBe(504);
      expect(took).toBeGreaterThanOrEqual(2150);
      expect(took).toBeLessThan(3300); // a running try let finish would end at 4000 ms, three tries at 6000
      expect((upstream.seen.get('/silent') ?? 0) - before).toBe(2);
    } finally {
      await own.stop();
    }
    await stillServing();
  });

  it('answers headers then stalls the body: the body ends in an error after BODY_IDLE_TIMEOUT_MS', async () => {
    const res = await fetch(`${amb.url}/stall-body`);
    expect(res.status).toBe(200);
    const t0 = performance.now();
    await expect(res.text()).rejects.toThrow();
    expect(performance.now() - t0).toBeLessThan(3000);
    await stillServing();
  });

  it('cuts a stalled response body after BODY_IDLE_TIMEOUT_MS, not after the much shorter TRY_TIMEOUT_MS', async () => {
    const own = await startAmbassador(runtime, {
      UPSTREAM_URL: upstream.url,
      BODY_IDLE_TIMEOUT_MS: '1000',
      TRY_TIMEOUT_MS: '200',
    });
    try {
      // Timed from the request: Deno and Bun read a short body whole before they answer, so the head
      // comes with the stall there, and the cut is seen at once.
      const t0 = performance.now();
      const res = await fetch(`${own.url}/stall-body`);
      expect(res.status).toBe(200);
      await expect(res.text()).rejects.toThrow();
      const took = performance.now() - t0;
      expect(took).toBeGreaterThanOrEqual(900);
      expect(took).toBeLessThan(3000);
    } finally {
      await own.stop();
    }
  });

  it('an app that leaves while the body is coming is told as gone, not as an upstream that failed', async () => {
    const id = `left-mid-body-${runtime}`;
    const socket = net.connect(amb.port, '127.0.0.1');
    socket.on('error', () => {});
    socket.write(`GET /stall-body HTTP/1.1\r\nHost: x\r\nX-Request-Id: ${id}\r\n\r\n`);
    await sleep(200); // the body has stalled, well before BODY_IDLE_TIMEOUT_MS cuts it
    socket.destroy();
    const line = await amb.waitForLine((l) => l.includes(`"${id}"`) && l.includes('"request"'), 3000);
    expect(JSON.parse(line)).toMatchObject({ id, status: 200, error: 'client went away during the response body' });
    await stillServing();
  });

  it('sends garbage instead of HTTP: 502, retried as a GET may be', async () => {
    const res = await fetch(`${amb.url}/garbage`);
    expect(res.status).toBe(502);
    expect(upstream.seen.get('/garbage')).toBe(3);
    await stillServing();
  });

  it('declares a longer body than it sends: the app sees a broken body, never a short one that looks whole', async () => {
    // Broken either way: the body errors, or (Bun, whose server holds a Content-Length response's head until
    // its body has begun) the response never comes whole.
    await expect(fetch(`${amb.url}/too-long`).then((res) => res.text())).rejects.toThrow();
    await stillServing();
  });

  it('sends more than it declares: the app gets exactly the declared body', async () => {
    const res = await fetch(`${amb.url}/too-short`);
    expect(await res.text()).toBe('hello');
    await stillServing();
  });

  it('closes a keep-alive connection just as it is reused: a GET is sent again and succeeds, a POST is not', async () => {
    // The race made on purpose: each connection's first request is answered; the moment the next one
    // arrives on it, the connection is closed without an answer — what an upstream closing an idle
    // connection does to a request written onto it at that instant.
    const raw = await startRawUpstream((req, socket) => {
      if (raw.requests.filter((q) => q.connection === req.connection).length > 1) socket.destroy();
      else socket.write(OK);
    });
    const own = await startAmbassador(runtime, {
      UPSTREAM_URL: raw.url,
      RETRY_BACKOFF_MS: '0',
      RETRY_BACKOFF_MAX_MS: '0',
      BREAKER_FAILURES: '0',
    });
    try {
      const seen = () => raw.requests.length;
      expect(await (await fetch(`${own.url}/first`)).text()).toBe('ok'); // leaves one pooled connection
      let before = seen();
      const get = await fetch(`${own.url}/again`);
      expect(await get.text()).toBe('ok');
      expect(seen() - before).toBe(2); // written onto the closing connection, then sent again
      before = seen();
      const post = await fetch(`${own.url}/order`, { method: 'POST', body: 'one order' });
      // Never sent twice: on Node it met the closing connection and, since the upstream may have taken it,
      // is answered 502; on Deno, whose client would resend it by itself, such a request never goes on a
      // reused connection at all, so it met no race.
      expect({ status: post.status, sent: seen() - before }).toEqual({
        status: runtime === 'deno' ? 200 : 502,
        sent: 1,
      });
      before = seen();
      await (await fetch(`${own.url}/warm`)).text();
      before = seen();
      const keyed = await fetch(`${own.url}/order`, {
        method: 'POST',
        body: 'one order',
        headers: { 'idempotency-key': 'k-1' },
      });
      expect(await keyed.text()).toBe('ok');
      expect(seen() - before).toBe(2);
    } finally {
      await own.stop();
      await raw.close();
    }
  });

  it('resets the connection before answering: a GET is retried and succeeds', async () => {
    const res = await fetch(`${amb.url}/reset-first`);
    expect(await res.text()).toBe('ok');
    expect(upstream.seen.get('/reset-first')).toBe(2);
  });

  it('answers very slowly, one byte at a time: the response arrives whole', async () => {
    const res = await fetch(`${amb.url}/byte-by-byte`);
    expect(await res.text()).toBe('slow but ok!');
  });

  it('sends a 1xx interim response first: the app gets the final one', async () => {
    const res = await fetch(`${amb.url}/interim`);
    expect(res.status).toBe(200);
    expect(await res.text()).toBe('ok');
  });

  it('sends huge response headers: a clean 502, and the ambassador lives on', async () => {
    const res = await fetch(`${amb.url}/huge-headers`);
    expect(res.status).toBe(502);
    await stillServing();
  });

  it('switches protocols though no upgrade was asked for: a 502 at once, and its place is given back', async () => {
    const t0 = performance.now();
    const res = await fetch(`${amb.url}/upgrade`);
    expect(res.status).toBe(502);
    expect(performance.now() - t0).toBeLessThan(1000); // not held until a timeout
    expect(await res.text()).toContain('switched protocols');
    await waitFor(
      'no place held',
      async () => (await scrape(amb)).get('ambassador_upstream_active_requests{route="default"}') === 0,
      3000,
    );
    await stillServing();
  });

  it('sends both Transfer-Encoding and Content-Length: a clean 502, never a body cut to look whole', async () => {
    const res = await fetch(`${amb.url}/te-and-cl`);
    expect(res.status).toBe(502);
    expect(await res.text()).toMatch(/Transfer-Encoding.*Content-Length/);
    await stillServing();
  });

  it.each(['soh', 'del', 'nul'])(
    'sends a control character (%s) in its reason phrase: never passed on, and the process lives on',
    async (which) => {
      const own = await startAmbassador(runtime, {
        UPSTREAM_URL: upstream.url,
        RETRY_ATTEMPTS: '1',
        BREAKER_FAILURES: '0',
      });
      try {
        const raw = await rawRequest(
          own.port,
          `GET /bad-reason-${which} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`,
          3000,
        );
        const statusLine = raw.slice(0, raw.indexOf('\r\n'));
        if (runtimeOf(runtime) === 'node') {
          // Node's client reads the head: the app gets the answer, with the standard reason phrase.
          expect(statusLine).toBe('HTTP/1.1 200 OK');
          expect(raw.endsWith('\r\n\r\nok')).toBe(true);
        } else {
          // Deno's and Bun's clients refuse such a head themselves: a clean 502.
          expect(statusLine).toBe('HTTP/1.1 502 Bad Gateway');
        }
        expect((await fetch(`${own.url}/ok`)).status).toBe(200);
        expect(own.child.exitCode).toBe(null);
      } finally {
        await own.stop();
      }
    },
  );

  it('sends a transfer coding other than chunked: a clean 502, never coded bytes the app is not told of', async () => {
    const own = await startAmbassador(runtime, {
      UPSTREAM_URL: upstream.url,
      RETRY_ATTEMPTS: '1',
      BREAKER_FAILURES: '0',
    });
    try {
      const res = await fetch(`${own.url}/gzip-chunked`);
      expect(res.status).toBe(502);
      expect(await res.text()).toContain(
        runtimeOf(runtime) === 'node' ? 'transfer coding other than chunked' : 'ambassador: upstream failed',
      );
    } finally {
      await own.stop();
    }
  });

  it('sends a Content-Length on a 204: the app gets the 204 without it', async () => {
    const raw = await rawRequest(
      Number(new URL(amb.url).port),
      'GET /no-content HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
      3000,
    );
    expect(raw).toMatch(/^HTTP\/1\.1 204/);
    expect(raw.toLowerCase()).not.toContain('content-length');
  });
});

describe.each(ARTIFACTS)('statuses that are no final HTTP status (%s)', (runtime) => {
  stopAfterEach();

  it.each(['999', '600', '099', '000'])(
    'answers 502 to status %s, closes that upstream connection, and keeps serving',
    async (code) => {
      const up = await startRawUpstream((req, socket) => {
        if (req.target === '/ok') return void socket.write(OK);
        socket.write(`HTTP/1.1 ${code} Weird\r\ncontent-length: 2\r\n\r\nno`);
      });
      const amb = await startAmbassador(runtime, { UPSTREAM_URL: up.url, RETRY_ATTEMPTS: '1', BREAKER_FAILURES: '0' });
      const res = await fetch(`${amb.url}/weird`);
      expect(res.status).toBe(502);
      expect(await res.text()).toMatch(/^ambassador: upstream failed: /);
      expect((await fetch(`${amb.url}/ok`)).status).toBe(200);
      const [weird, ok] = up.requests.slice(-2);
      expect(weird.target).toBe('/weird');
      // Node: the connection that carried it is closed, and the next request comes on a fresh one. Deno's and
      // Bun's fetch keep their own pools: the answer's body is cancelled, and a connection whose framing was
      // whole may carry the next request.
      if (runtimeOf(runtime) === 'node') expect(ok.connection).not.toBe(weird.connection);
    },
  );
});

describe.each(ARTIFACTS)('status lines of another major HTTP version (%s)', (runtime) => {
  stopAfterEach();

  // (A later minor version of 1 is read as 1.1, RFC 9112 §2.3: Bun's client does, Deno's refuses it.)
  it.each(['HTTP/2.0', 'HTTP/3.0', 'HTTP/2'])(
    'answers 502 to an upstream whose status line says %s, and keeps serving',
    async (version) => {
      const up = await startRawUpstream((req, socket) => {
        if (req.target === '/ok') return void socket.write(OK);
        socket.write(`${version} 200 OK\r\ncontent-length: 2\r\n\r\nno`);
      });
      const amb = await startAmbassador(runtime, { UPSTREAM_URL: up.url, RETRY_ATTEMPTS: '1', BREAKER_FAILURES: '0' });
      const res = await fetch(`${amb.url}/other`);
      expect(res.status).toBe(502);
      expect(await res.text()).toMatch(/^ambassador: upstream failed: /);
      expect((await fetch(`${amb.url}/ok`)).status).toBe(200);
    },
  );
});

describe.each(ARTIFACTS)('no place, timer or in-flight entry outlives its request (%s)', (runtime) => {
  stopAfterEach();

  it('gives back every place, whatever stage a request ends at', async () => {
    const upstream = await misbehavingUpstream();
    const slow = await startUpstream((req, res) => {
      if (req.url === '/slow-body') {
        res.writeHead(200, { 'content-length': '10' });
        res.write('12345');
        return; // the rest never comes
      }
      setTimeout(() => res.end('late'), 2000);
    });
    const dir = {
      routes: [
        {
          name: 'faulty',
          prefix: '/f',
          stripPrefix: true,
          upstream: upstream.url,
          retryAttempts: 1,
          breakerFailures: 0,
        },
        {
          name: 'slow',
          prefix: '/s',
          stripPrefix: true,
          upstream: slow.url,
          retryAttempts: 3,
          retryBackoffMs: 1500,
          retryBackoffMaxMs: 1500,
          breakerFailures: 0,
        },
      ],
    };
    const { mkdtempSync, writeFileSync, rmSync } = await import('node:fs');
    const os = await import('node:os');
    const path = await import('node:path');
    const folder = mkdtempSync(path.join(os.tmpdir(), 'ambassador-places-'));
    const file = path.join(folder, 'routes.json');
    writeFileSync(file, JSON.stringify(dir));
    try {
      const amb = await startAmbassador(runtime, {
        ROUTES_FILE: file,
        MAX_IN_FLIGHT: '2',
        QUEUE_SIZE: '4',
        QUEUE_TIMEOUT_MS: '3000',
        TRY_TIMEOUT_MS: '300',
        BODY_IDLE_TIMEOUT_MS: '400',
      });
      const places = async () => {
        const m = await scrape(amb);
        return [
          m.get('ambassador_upstream_active_requests{route="faulty"}'),
          m.get('ambassador_upstream_active_requests{route="slow"}'),
          m.get('ambassador_upstream_queued_requests{route="slow"}'),
          m.get('ambassador_requests_in_flight'),
        ];
      };
      // A stray 101, three times over a limit of two: each gives its place back.
      for (let i = 0; i < 3; i++) expect((await fetch(`${amb.url}/f/upgrade`)).status).toBe(502);
      // The app goes away while its request waits on the upstream, while it waits in the queue, and while
      // it waits out a backoff.
      const gone = async (pathname: string, afterMs: number) => {
        const ac = new AbortController();
        const p = fetch(`${amb.url}${pathname}`, { signal: ac.signal }).catch(() => 'aborted');
        await sleep(afterMs);
        ac.abort();
        expect(await p).toBe('aborted');
      };
      const holders = [0, 1].map(() => fetch(`${amb.url}/s/wait`).then((r) => r.text()));
      await waitFor('two places taken', async () => (await places())[1] === 2, 3000);
      await gone('/s/queued', 200); // left in the queue
      await Promise.all(holders.map((h) => h.catch(() => '')));
      await gone('/f/silent', 100); // left during an attempt
      await gone('/s/backoff', 600); // the first try times out at 300 ms: left during the 1.5 s backoff
      // The app goes away in the middle of a response body, and a body stalls.
      const ac = new AbortController();
      const r = await fetch(`${amb.url}/s/slow-body`, { signal: ac.signal });
      const reader = r.body!.getReader();
      await reader.read();
      ac.abort();
      const stalled = await fetch(`${amb.url}/s/slow-body`);
      await expect(stalled.text()).rejects.toThrow();
      await waitFor('every place given back', async () => (await places()).every((v) => v === 0), 5000);
      expect((await fetch(`${amb.url}/f/ok`)).status).toBe(200);
    } finally {
      await upstream.close();
      rmSync(folder, { recursive: true, force: true });
    }
  });

  it("passes on an upstream's early answer to an upload (413 before the body is read), and holds nothing against it", async () => {
    const refuse = (_req: http.IncomingMessage, res: http.ServerResponse) => {
      res.writeHead(413, { 'content-type': 'text/plain', connection: 'close' });
      res.end('too large');
    };
    const up = await startUpstream(refuse, { readBody: false });
    // Like nginx's client_max_body_size: an upload that asks first is turned down on its head alone.
    up.server.on('checkContinue', refuse);
    const amb = await startAmbassador(runtime, { UPSTREAM_URL: up.url, BREAKER_FAILURES: '2' });
    // node:http, as an app would upload: it reads an answer that comes while it is still sending.
    const upload = (size: number) =>
      new Promise<{ status: number; text: string }>((resolve, reject) => {
        const req = http.request(
          `${amb.url}/upload`,
          { method: 'PUT', headers: { 'content-length': String(size) } },
          (res) => {
            let text = '';
            res.on('data', (d) => (text += d));
            res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
          },
        );
        req.on('error', (err) => (req.destroyed && (err as NodeJS.ErrnoException).code === 'EPIPE') || reject(err));
        req.end(Buffer.alloc(size));
      });
    // Small and large in turn, on the app's keep-alive connections: an answer that came before the body
    // was all read closes its connection, so the next request is never stuck behind what is left of it.
    for (
      const size of [
        10 * 1024,
        4 * 1024 * 1024,
        10 * 1024,
        4 * 1024 * 1024,
        10 * 1024,
        10 * 1024,
        4 * 1024 * 1024,
        10 * 1024,
      ]
    ) {
      const r = await upload(size);
      expect(r.status, `${size} bytes`).toBe(413);
      expect(r.text).toBe('too large');
    }
    const m = await scrape(amb);
    expect(m.get(`ambassador_upstream_endpoint_ejections_total{route="default",endpoint="${new URL(up.url).host}"}`))
      .toBe(0);
  });
});

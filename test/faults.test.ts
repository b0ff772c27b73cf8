/** Faults from the upstream, each from a real misbehaving server speaking raw TCP. For each, what the app
 * receives is well defined — a correct response, a clean 502/504, or a body that ends in an error, never a
 * short body that looks whole — retries follow the rules, and the ambassador keeps serving. */
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RUNTIMES, startAmbassador, type AmbassadorProc } from './helpers.ts';

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
    close: () => new Promise<void>((r) => {
      for (const s of sockets) s.destroy();
      server.close(() => r());
    }),
  };
}

function answer(path: string, socket: net.Socket, n: number): void {
  switch (path) {
    case '/ok': return void socket.write(OK);
    case '/silent': return; // accepts, reads, never answers
    case '/stall-body':
      return void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst part'); // then nothing
    case '/garbage': return void socket.end('SSH-2.0-OpenSSH_9.2 this is not HTTP\r\n\r\n');
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
    case '/reset-first':
      if (n === 1) return void socket.resetAndDestroy();
      return void socket.write(OK);
    default: return void socket.write('HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n');
  }
}

describe.each(RUNTIMES)('upstream faults (%s)', (runtime) => {
  let upstream: Awaited<ReturnType<typeof misbehavingUpstream>>;
  let amb: AmbassadorProc;
  beforeAll(async () => {
    upstream = await misbehavingUpstream();
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url, TRY_TIMEOUT_MS: '300', REQUEST_TIMEOUT_MS: '1500', BODY_IDLE_TIMEOUT_MS: '500', RETRY_BACKOFF_MS: '0', RETRY_BACKOFF_MAX_MS: '0' });
  });
  afterAll(async () => {
    await amb?.stop();
    await upstream?.close();
  });
  const stillServing = async () => expect(await (await fetch(`${amb.url}/ok`)).text()).toBe('ok');

  it('accepts and never answers: 504 within REQUEST_TIMEOUT_MS, every attempt counted at the upstream', async () => {
    const t0 = performance.now();
    const res = await fetch(`${amb.url}/silent`);
    expect(res.status).toBe(504);
    expect(performance.now() - t0).toBeLessThan(2500);
    expect(upstream.seen.get('/silent')).toBe(3);
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

  it('sends garbage instead of HTTP: 502, retried as a GET may be', async () => {
    const res = await fetch(`${amb.url}/garbage`);
    expect(res.status).toBe(502);
    expect(upstream.seen.get('/garbage')).toBe(3);
    await stillServing();
  });

  it('declares a longer body than it sends: the app sees a broken body, never a short one that looks whole', async () => {
    const res = await fetch(`${amb.url}/too-long`);
    await expect(res.text()).rejects.toThrow();
    await stillServing();
  });

  it('sends more than it declares: the app gets exactly the declared body', async () => {
    const res = await fetch(`${amb.url}/too-short`);
    expect(await res.text()).toBe('hello');
    await stillServing();
  });

  it('closes a keep-alive connection just as it is reused: GETs still all succeed', async () => {
    for (let i = 0; i < 10; i++) {
      const res = await fetch(`${amb.url}/close-after`);
      expect(await res.text()).toBe('ok');
      await new Promise((r) => setTimeout(r, 10));
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
});

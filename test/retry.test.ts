/** Every retry rule, proved by counting requests at a real upstream (or, for a dead port, in the log). */
import http from 'node:http';
import { describe, expect, it } from 'vitest';
import {
  type AmbassadorProc,
  ARTIFACTS,
  deadPort,
  scrape,
  sleep,
  startAmbassador,
  startUpstream,
  stopAfterEach,
  type Upstream,
} from './helpers.ts';

describe.each(ARTIFACTS)('retries (%s)', (runtime) => {
  let upstream: Upstream | undefined;
  let amb: AmbassadorProc | undefined;
  stopAfterEach();
  const attemptLines = async (a: AmbassadorProc) => {
    await a.settled();
    return a.logs().filter((l) => typeof l.msg === 'string' && /^attempt \d+ failed/.test(l.msg));
  };

  it('retries a GET after 503 and honours Retry-After', async () => {
    upstream = await startUpstream((_q, res, _s, n) => {
      if (n === 1) {
        res.writeHead(503, { 'retry-after': '1' });
        return res.end('busy');
      }
      res.end('fine');
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    const t0 = performance.now();
    const res = await fetch(`${amb.url}/a`);
    expect(await res.text()).toBe('fine');
    expect(performance.now() - t0).toBeGreaterThanOrEqual(950);
    expect(upstream.seen.length).toBe(2);
    const [line] = await attemptLines(amb);
    expect(line).toMatchObject({ level: 'warn', attempt: 1, kind: 'status', status: 503, retry_in_ms: 1000 });
  });

  it('retries a GET on connection refused, logs each failed attempt, then answers 502 saying why', async () => {
    amb = await startAmbassador(runtime, { UPSTREAM_URL: `http://127.0.0.1:${await deadPort()}` });
    const res = await fetch(`${amb.url}/inventory`);
    expect(res.status).toBe(502);
    expect(await res.text()).toMatch(/^ambassador: upstream failed: .*(refused|ECONNREFUSED).*\(3 attempts\)/i);
    const lines = await attemptLines(amb);
    expect(lines.map((l) => l.attempt)).toEqual([1, 2, 3]);
    expect(lines.every((l) => l.kind === 'refused')).toBe(true);
    expect(String(lines[0].msg)).toMatch(/^attempt 1 failed: .*refused/i);
    expect(lines[2]).toMatchObject({ skip: 'attempts' });
  });

  it('retries a GET after a per-try timeout, and the upstream sees both attempts', async () => {
    upstream = await startUpstream((_q, res, _s, n) => {
      if (n === 1) return; // never answers
      res.end('second');
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url, TRY_TIMEOUT_MS: '300' });
    const res = await fetch(`${amb.url}/slow`);
    expect(await res.text()).toBe('second');
    expect(upstream.seen.length).toBe(2);
    expect((await attemptLines(amb))[0]).toMatchObject({ kind: 'timeout' });
  });

  it('never repeats a POST after a 503: the upstream sees it once and the app gets its answer', async () => {
    upstream = await startUpstream((_q, res) => {
      res.writeHead(503);
      res.end('upstream says no');
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    const res = await fetch(`${amb.url}/orders`, { method: 'POST', body: '{"n":1}' });
    expect(res.status).toBe(503);
    expect(await res.text()).toBe('upstream says no');
    expect(upstream.seen.length).toBe(1);
    expect((await attemptLines(amb))[0]).toMatchObject({ skip: 'method' });
  });

  it('never repeats a POST after a timeout, and answers 504', async () => {
    upstream = await startUpstream(() => {});
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url, TRY_TIMEOUT_MS: '300' });
    const res = await fetch(`${amb.url}/orders`, { method: 'POST', body: 'x' });
    expect(res.status).toBe(504);
    expect(await res.text()).toMatch(/timed out.*\(1 attempt\)/);
    expect(upstream.seen.length).toBe(1);
  });

  it('repeats a POST that carries an Idempotency-Key, with the same body', async () => {
    upstream = await startUpstream((_q, res, _s, n) => {
      res.writeHead(n === 1 ? 503 : 201);
      res.end();
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    const res = await fetch(`${amb.url}/orders`, {
      method: 'POST',
      body: 'same body',
      headers: { 'idempotency-key': 'k1' },
    });
    expect(res.status).toBe(201);
    expect(upstream.seen.map((s) => s.body.toString())).toEqual(['same body', 'same body']);
  });

  it('repeats a POST the upstream cannot have received (connection refused)', async () => {
    amb = await startAmbassador(runtime, { UPSTREAM_URL: `http://127.0.0.1:${await deadPort()}` });
    const res = await fetch(`${amb.url}/orders`, { method: 'POST', body: 'x' });
    expect(res.status).toBe(502);
    expect((await attemptLines(amb)).map((l) => l.attempt)).toEqual([1, 2, 3]);
  });

  it('streams a body larger than RETRY_BODY_MAX_BYTES once, and logs that the retry was skipped', async () => {
    upstream = await startUpstream((_q, res) => {
      res.writeHead(503);
      res.end();
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url, RETRY_BODY_MAX_BYTES: '1024' });
    const body = 'b'.repeat(5000);
    const res = await fetch(`${amb.url}/big`, { method: 'PUT', body });
    expect(res.status).toBe(503);
    expect(upstream.seen.length).toBe(1);
    expect(upstream.seen[0].body.toString()).toBe(body);
    expect((await attemptLines(amb))[0]).toMatchObject({ skip: 'body' });
    expect(String((await attemptLines(amb))[0].msg)).toContain('giving up (body)');
  });

  it('replays a small body on every attempt', async () => {
    upstream = await startUpstream((_q, res, _s, n) => {
      res.writeHead(n < 3 ? 502 : 200);
      res.end();
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    const res = await fetch(`${amb.url}/put`, { method: 'PUT', body: 'v1' });
    expect(res.status).toBe(200);
    expect(upstream.seen.map((s) => s.body.toString())).toEqual(['v1', 'v1', 'v1']);
  });

  it("passes the upstream's own last answer through when every attempt got a 503", async () => {
    upstream = await startUpstream((_q, res, _s, n) => {
      res.writeHead(503, { 'x-try': String(n) });
      res.end(`busy ${n}`);
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url });
    const res = await fetch(`${amb.url}/x`);
    expect(res.status).toBe(503);
    expect(res.headers.get('x-try')).toBe('3');
    expect(await res.text()).toBe('busy 3');
    expect(upstream.seen.length).toBe(3);
  });

  it('keeps the whole request within REQUEST_TIMEOUT_MS, retries included: the deadline cuts the running try short', async () => {
    upstream = await startUpstream(() => {});
    // Tries of 2000 ms against a 2200 ms deadline: the first try times out, the second is cut to what is
    // left. Without the deadline this takes 10 s; with a deadline that lets the running try finish, 4 s.
    amb = await startAmbassador(runtime, {
      UPSTREAM_URL: upstream.url,
      TRY_TIMEOUT_MS: '2000',
      REQUEST_TIMEOUT_MS: '2200',
      RETRY_ATTEMPTS: '5',
      RETRY_BACKOFF_MS: '0',
      RETRY_BACKOFF_MAX_MS: '0',
    });
    const t0 = performance.now();
    const res = await fetch(`${amb.url}/x`);
    const took = performance.now() - t0;
    expect(res.status).toBe(504);
    expect(took).toBeGreaterThanOrEqual(2150);
    expect(took).toBeLessThan(3300);
    expect(upstream.seen.length, amb.lines.join('\n')).toBe(2);
  });

  it('does not wait for a Retry-After that would pass the deadline', async () => {
    upstream = await startUpstream((_q, res) => {
      res.writeHead(503, { 'retry-after': '30' });
      res.end();
    });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url, REQUEST_TIMEOUT_MS: '2000' });
    const t0 = performance.now();
    const res = await fetch(`${amb.url}/x`);
    expect(res.status).toBe(503);
    expect(performance.now() - t0).toBeLessThan(1000);
    expect(upstream.seen.length).toBe(1);
    expect((await attemptLines(amb))[0]).toMatchObject({ skip: 'deadline' });
  });

  it('keeps retries to RETRY_BUDGET_PERCENT of requests under steady load: a failing upstream gets about 1.2× its traffic, not 3×', async () => {
    upstream = await startUpstream((_q, res) => {
      res.writeHead(503);
      res.end();
    });
    const a = (amb = await startAmbassador(runtime, {
      UPSTREAM_URL: upstream.url,
      BREAKER_FAILURES: '0',
      RETRY_BUDGET_PERCENT: '20',
      RETRY_BUDGET_MIN_PER_SEC: '0',
      RETRY_ATTEMPTS: '3',
      RETRY_BACKOFF_MS: '0',
      RETRY_BACKOFF_MAX_MS: '0',
      LOG_LEVEL: 'error',
    }));
    let sent = 0;
    const stopAt = performance.now() + 3000;
    await Promise.all(Array.from({ length: 8 }, async () => {
      while (performance.now() < stopAt) {
        await (await fetch(`${a.url}/x`)).arrayBuffer();
        sent++;
      }
    }));
    const ratio = upstream.seen.length / sent;
    expect(sent).toBeGreaterThan(60); // enough for the budget to bind, on a loaded machine too
    // Without a budget every request is tried three times (3.0); the budget holds retries to 20 %.
    expect(ratio).toBeGreaterThan(1.1);
    expect(ratio).toBeLessThanOrEqual(1.21);
  });

  it('keeps retries within the budget when the upstream keeps failing', async () => {
    upstream = await startUpstream((_q, res) => {
      res.writeHead(503);
      res.end();
    });
    // No percentage, a floor of 1 retry/s: at most 10 retries in the 10 s window. The breaker is off, or
    // it would (rightly) stop sending to this upstream after 5 failures in a row.
    amb = await startAmbassador(runtime, {
      UPSTREAM_URL: upstream.url,
      BREAKER_FAILURES: '0',
      RETRY_BUDGET_PERCENT: '0',
      RETRY_BUDGET_MIN_PER_SEC: '1',
      RETRY_BACKOFF_MS: '0',
      RETRY_BACKOFF_MAX_MS: '0',
    });
    for (let i = 0; i < 20; i++) await (await fetch(`${amb.url}/x`)).text();
    expect(upstream.seen.length).toBe(20 + 10);
    expect((await attemptLines(amb)).some((l) => l.skip === 'budget')).toBe(true);
  });

  it('does not count the time the app takes to send a small body against REQUEST_TIMEOUT_MS', async () => {
    upstream = await startUpstream((_q, res, seen) => res.end(`got ${seen.body.length}`));
    amb = await startAmbassador(runtime, { UPSTREAM_URL: upstream.url, REQUEST_TIMEOUT_MS: '1500' });
    // 1 KiB, kept for replay, sent in eight pieces over 2.4 s: longer than the request's whole limit.
    const answer = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = http.request(
        `${amb!.url}/orders`,
        { method: 'POST', headers: { 'content-length': '1024' } },
        (res) => {
          let body = '';
          res.on('data', (c) => (body += c));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
        },
      );
      req.on('error', reject);
      void (async () => {
        for (let i = 0; i < 8; i++) {
          req.write(Buffer.alloc(128, 'p'));
          await sleep(300);
        }
        req.end();
      })();
    });
    expect(answer).toEqual({ status: 200, body: 'got 1024' });
    expect(upstream.seen.length).toBe(1);
  });

  it('does not wait out a Retry-After longer than 300 s, even without a deadline: the app gets the 503 and its Retry-After at once', async () => {
    upstream = await startUpstream((_q, res) => {
      res.writeHead(503, { 'retry-after': '99999999' });
      res.end('come back much later');
    });
    amb = await startAmbassador(runtime, {
      UPSTREAM_URL: upstream.url,
      REQUEST_TIMEOUT_MS: '0',
      BREAKER_FAILURES: '0',
    });
    const t0 = performance.now();
    const res = await fetch(`${amb.url}/a`);
    expect(res.status).toBe(503);
    expect(res.headers.get('retry-after')).toBe('99999999');
    expect(performance.now() - t0).toBeLessThan(1000);
    expect(upstream.seen.length).toBe(1);
    expect((await attemptLines(amb))[0]).toMatchObject({ skip: 'deadline' });
    await sleep(200); // a timer that overflowed would have fired at once: a second attempt would be here by now
    expect(upstream.seen.length).toBe(1);
    expect(amb.stderr.join('\n')).not.toContain('TimeoutOverflowWarning');
  });

  it('holds every body kept for replay together to RETRY_BODIES_MAX_BYTES: past it a body is streamed and sent once', async () => {
    // Every attempt waits 400 ms and answers 503, so each request would be retried if its body could be.
    upstream = await startUpstream((_q, res) =>
      setTimeout(() => {
        res.writeHead(503);
        res.end('busy');
      }, 400)
    );
    amb = await startAmbassador(runtime, {
      UPSTREAM_URL: upstream.url,
      RETRY_ATTEMPTS: '2',
      RETRY_BODIES_MAX_BYTES: String(256 * 1024),
      BREAKER_FAILURES: '0',
      RETRY_BUDGET_MIN_PER_SEC: '1000',
      LOG_LEVEL: 'warn',
    });
    const body = new Uint8Array(64 * 1024).fill(98);
    let peak = 0;
    let polling = true;
    const poll = (async () => {
      while (polling) {
        peak = Math.max(peak, (await scrape(amb!)).get('ambassador_retry_body_bytes') ?? NaN);
        await sleep(20);
      }
    })();
    const answers = await Promise.all(
      Array.from({ length: 40 }, () => fetch(`${amb!.url}/put`, { method: 'PUT', body }).then((r) => r.status)),
    );
    polling = false;
    await poll;
    expect(answers.every((s) => s === 503)).toBe(true);
    // Four bodies of 64 KiB fit in 256 KiB at once: those four are sent twice, the other 36 once.
    expect(upstream.seen.length).toBeGreaterThanOrEqual(41);
    expect(upstream.seen.length).toBeLessThanOrEqual(44);
    expect(peak).toBeGreaterThan(0);
    expect(peak).toBeLessThanOrEqual(256 * 1024);
    const m = await scrape(amb);
    expect(m.get('ambassador_upstream_retries_skipped_total{route="default",reason="body"}')).toBe(
      40 - (upstream.seen.length - 40),
    );
    expect(m.get('ambassador_retry_body_bytes')).toBe(0);
  });

  it('replays a body of exactly RETRY_BODY_MAX_BYTES, and sends one byte more only once', async () => {
    upstream = await startUpstream((_q, res) => {
      res.writeHead(503);
      res.end('busy');
    });
    amb = await startAmbassador(runtime, {
      UPSTREAM_URL: upstream.url,
      RETRY_BODY_MAX_BYTES: '1024',
      BREAKER_FAILURES: '0',
    });
    expect((await fetch(`${amb.url}/at-limit`, { method: 'PUT', body: new Uint8Array(1024).fill(97) })).status).toBe(
      503,
    );
    expect(upstream.seen.map((s) => `${s.url} ${s.body.length}`)).toEqual(Array(3).fill('/at-limit 1024'));
    expect((await fetch(`${amb.url}/past-limit`, { method: 'PUT', body: new Uint8Array(1025).fill(98) })).status).toBe(
      503,
    );
    expect(upstream.seen.slice(3).map((s) => `${s.url} ${s.body.length}`)).toEqual(['/past-limit 1025']);
    // The same two sizes sent chunked, with no Content-Length to decide by: the bytes read decide.
    const chunked = (size: number) =>
      new ReadableStream<Uint8Array>({
        start(c) {
          c.enqueue(new Uint8Array(size - 1).fill(99));
          c.enqueue(new Uint8Array(1).fill(99));
          c.close();
        },
      });
    for (const [name, size, times] of [['chunked-at-limit', 1024, 3], ['chunked-past-limit', 1025, 1]] as const) {
      const before = upstream.seen.length;
      const res = await fetch(
        `${amb.url}/${name}`,
        { method: 'PUT', body: chunked(size), duplex: 'half' } as RequestInit,
      );
      expect(res.status, name).toBe(503);
      expect(upstream.seen.slice(before).map((s) => `${s.url} ${s.body.length}`), name).toEqual(
        Array(times).fill(`/${name} ${size}`),
      );
    }
  });

  it('sends a retry to another endpoint than the one that failed, so one dead endpoint costs the app nothing', async () => {
    upstream = await startUpstream((_q, res) => res.end('alive'));
    const dead = `127.0.0.1:${await deadPort()}`;
    // A breaker that never trips (100 failures), so neither it nor the balancer's failure penalty (counted
    // only without a breaker) keeps the dead endpoint away: only the retry's choice of endpoint does.
    amb = await startAmbassador(runtime, {
      UPSTREAM_URL: `http://${dead},${upstream.url}`,
      BREAKER_FAILURES: '100',
      RETRY_ATTEMPTS: '2',
      LOG_LEVEL: 'warn',
    });
    for (let i = 0; i < 20; i++) expect((await fetch(`${amb.url}/x`)).status).toBe(200);
    expect(upstream.seen.length).toBe(20);
    expect((await scrape(amb)).get(`ambassador_upstream_endpoint_requests_total{route="default",endpoint="${dead}"}`))
      .toBeGreaterThan(0);
  });
});

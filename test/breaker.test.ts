/** Circuit breaking per endpoint: real upstreams on loopback going down
 * and coming back, with every request counted at the upstream and the state read from /metrics. */
import { describe, expect, it } from 'vitest';
import {
  ARTIFACTS,
  deadPort,
  scrape,
  sleep,
  startAmbassador,
  startUpstream,
  stopAfterEach,
  type Upstream,
  waitFor,
} from './helpers.ts';

describe.each(ARTIFACTS)('circuit breaking on real upstreams (%s)', (runtime) => {
  stopAfterEach();
  const ok = (name: string) => startUpstream((_q, res) => res.end(name));
  const key = (u: Upstream) => `127.0.0.1:${u.port}`;
  /** `n` requests, four at a time (with several in flight, P2C spreads them over every endpoint), each 200. */
  const load = async (url: string, n: number) => {
    await Promise.all(Array.from({ length: 4 }, async () => {
      while (n-- > 0) expect((await fetch(url)).status).toBe(200);
    }));
  };
  const state = (m: Map<string, number>, endpoint: string, s: string) =>
    m.get(`ambassador_upstream_endpoint_state{route="default",endpoint="${endpoint}",state="${s}"}`);

  it('ejects an endpoint that goes down, shifts its traffic to the others, and re-admits it after a probe once it is back', async () => {
    // a and b answer 100 ms late, so the balancer prefers c, and c is still chosen once it is down (a failure leaves
    // its latency average as it was). With three alike, one slow sample of c's (a connection set up, a pause of a
    // loaded machine) is its average for seconds, the balancer sends it nothing, and it is never ejected.
    const a = await startUpstream((_q, res) => void setTimeout(() => res.end('a'), 100));
    const b = await startUpstream((_q, res) => void setTimeout(() => res.end('b'), 100));
    let c = await ok('c');
    const port = c.port;
    const amb = await startAmbassador(runtime, {
      UPSTREAM_URL: [a, b, c].map((u) => u.url).join(','),
      BREAKER_FAILURES: '3',
      BREAKER_OPEN_MS: '2500',
      RETRY_BACKOFF_MS: '0',
      RETRY_BACKOFF_MAX_MS: '0',
    });
    await load(`${amb.url}/x`, 30);
    expect(c.seen.length).toBeGreaterThan(0); // every endpoint takes a share while all are healthy

    await c.close();
    // Refused attempts are retried on another endpoint: the app sees no failure while c is ejected.
    await load(`${amb.url}/x`, 60);
    const ejected = await scrape(amb);
    expect(state(ejected, `127.0.0.1:${port}`, 'open')).toBe(1);
    expect(ejected.get(`ambassador_upstream_endpoint_ejections_total{route="default",endpoint="127.0.0.1:${port}"}`))
      .toBe(1);
    const line = await amb.waitForLine((l) => l.includes('ejected'));
    expect(JSON.parse(line)).toMatchObject({
      level: 'warn',
      route: 'default',
      endpoint: `127.0.0.1:${port}`,
      state: 'open',
    });
    const attemptsOnC = ejected.get(
      `ambassador_upstream_endpoint_requests_total{route="default",endpoint="127.0.0.1:${port}"}`,
    )!;
    const servedByOthers = a.seen.length + b.seen.length;
    await load(`${amb.url}/x`, 20);
    // While open, not one attempt goes to c; a and b take all twenty.
    expect(
      (await scrape(amb)).get(
        `ambassador_upstream_endpoint_requests_total{route="default",endpoint="127.0.0.1:${port}"}`,
      ),
    ).toBe(attemptsOnC);
    expect(a.seen.length + b.seen.length).toBe(servedByOthers + 20);

    c = await startUpstream((_q, res) => res.end('c'), { port });
    // Once its ejection (2.5 s) is over, a probe finds it back: keep asking until it has one.
    await waitFor('a probe to reach c', async () => {
      await load(`${amb.url}/x`, 5);
      return c.seen.length > 0;
    }, 10_000);
    await load(`${amb.url}/x`, 60);
    expect(state(await scrape(amb), key(c), 'closed')).toBe(1);
    await amb.settled();
    const lines = amb.logs().filter((l) => l.endpoint === key(c) && !l.id).map((l) => l.state);
    expect(lines).toEqual(['open', 'half-open', 'closed']);
  });

  it('answers 503 with Retry-After in seconds once every endpoint is ejected, instead of waiting on timeouts', async () => {
    // Two upstreams that accept and never answer: each attempt waits TRY_TIMEOUT_MS until the breakers open.
    const hang = () => startUpstream(() => {}, { readBody: false });
    const x = await hang();
    const y = await hang();
    const amb = await startAmbassador(runtime, {
      UPSTREAM_URL: `${x.url},${y.url}`,
      BREAKER_FAILURES: '2',
      BREAKER_OPEN_MS: '30000',
      TRY_TIMEOUT_MS: '1000',
      RETRY_ATTEMPTS: '2',
      RETRY_BACKOFF_MS: '0',
      RETRY_BACKOFF_MAX_MS: '0',
    });
    for (let i = 0; i < 2; i++) expect((await fetch(`${amb.url}/slow`)).status).toBe(504);
    const seenBefore = x.seen.length + y.seen.length;
    expect(seenBefore).toBe(4);
    const times: number[] = [];
    for (let i = 0; i < 20; i++) {
      const t0 = performance.now();
      const res = await fetch(`${amb.url}/slow`);
      times.push(performance.now() - t0);
      expect(res.status).toBe(503);
      // Seconds until the first ejection (30 s) ends: at most 30, and not yet much less.
      const retryAfter = Number(res.headers.get('retry-after'));
      expect(retryAfter).toBeGreaterThanOrEqual(20);
      expect(retryAfter).toBeLessThanOrEqual(30);
      expect(await res.text()).toMatch(/circuit open: all 2 endpoints are ejected/);
    }
    // A timeout would be 1000 ms each; room left for a loaded machine.
    expect(times.sort((a, b) => a - b)[10]).toBeLessThan(250);
    expect(Math.max(...times)).toBeLessThan(800);
    expect(x.seen.length + y.seen.length).toBe(seenBefore); // not one more request reached them
    const m = await scrape(amb);
    expect(m.get('ambassador_requests_rejected_total{route="default",reason="circuit_open"}')).toBe(20);
  });

  it('sends a single probe to a half-open endpoint while other requests are refused, not a burst', async () => {
    let release: (() => void) | undefined;
    let healthy = false;
    const port = await deadPort();
    const up = await startUpstream((_q, res) => {
      if (!healthy) return void res.writeHead(500).end();
      if (release) return void res.end('ok');
      release = () => res.end('ok'); // hold the probe until the test has sent the burst
    }, { port });
    const amb = await startAmbassador(runtime, {
      UPSTREAM_URL: up.url,
      BREAKER_FAILURES: '2',
      BREAKER_OPEN_MS: '300',
      RETRY_ATTEMPTS: '1',
    });
    for (let i = 0; i < 2; i++) expect((await fetch(`${amb.url}/x`)).status).toBe(500);
    healthy = true;
    await sleep(350);
    const probe = fetch(`${amb.url}/x`);
    while (!release) await sleep(5);

    const burst = await Promise.all(Array.from({ length: 10 }, () => fetch(`${amb.url}/x`).then((r) => r.status)));
    expect(burst.every((s) => s === 503)).toBe(true);
    expect(up.seen.length).toBe(3);
    release();
    expect((await probe).status).toBe(200);
    expect((await fetch(`${amb.url}/x`)).status).toBe(200);
  });

  it('answers Retry-After with the seconds until the first ejection ends, when every endpoint is ejected', async () => {
    const a = await ok('a');
    const b = await ok('b');
    const amb = await startAmbassador(runtime, {
      UPSTREAM_URL: `${a.url},${b.url}`,
      BREAKER_FAILURES: '1',
      BREAKER_OPEN_MS: '10000',
      RETRY_ATTEMPTS: '1',
    });
    await a.close();
    await waitFor('a ejected', async () => {
      await fetch(`${amb.url}/x`);
      return state(await scrape(amb), key(a), 'open') === 1;
    });
    const firstEjected = performance.now();
    await sleep(3000 - (performance.now() - firstEjected));
    await b.close();
    expect((await fetch(`${amb.url}/x`)).status).toBe(502); // b refuses, and is ejected 3 s after a
    const all = await fetch(`${amb.url}/x`);
    expect(all.status).toBe(503);
    // a's ejection ends 7 s from now, b's 10 s from now: the app may come back when the first one ends.
    expect(all.headers.get('retry-after')).toBe('7');
  });

  it('doubles an ejection that follows soon after the last, end to end', async () => {
    const amb = await startAmbassador(runtime, {
      UPSTREAM_URL: `http://127.0.0.1:${await deadPort()}`,
      BREAKER_FAILURES: '1',
      BREAKER_OPEN_MS: '400',
      RETRY_ATTEMPTS: '1',
    });
    const ejections = () => amb.logs().filter((l) => String(l.msg).includes('ejected for')).map((l) => l.open_ms);
    expect((await fetch(`${amb.url}/x`)).status).toBe(502);
    await waitFor('the first ejection', () => ejections().length === 1);
    // Once it is over, the probe fails too: the next ejection is twice as long, and the one after that 4×.
    for (const n of [2, 3]) {
      await waitFor(`ejection ${n}`, async () => {
        await fetch(`${amb.url}/x`);
        return ejections().length === n;
      }, 10_000);
    }
    expect(ejections()).toEqual([400, 800, 1600]);
  });
});

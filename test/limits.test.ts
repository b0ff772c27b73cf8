/** The concurrency limit and the local rate limit: bursts of real
 * requests through the ambassador, counted at a real upstream. */
import http from 'node:http';
import { describe, expect, it } from 'vitest';
import {
  ARTIFACTS,
  routesFile,
  scrape,
  sleep,
  startAmbassador,
  startUpstream,
  stopAfterEach,
  waitFor,
} from './helpers.ts';

describe.each(ARTIFACTS)('limits under a burst of real requests (%s)', (runtime) => {
  stopAfterEach();

  it('holds the concurrency limit exactly: the queue waits, the rest get 503 at once', async () => {
    const held: http.ServerResponse[] = [];
    let most = 0;
    const up = await startUpstream((_q, res) => {
      held.push(res);
      most = Math.max(most, held.filter((r) => !r.writableEnded).length);
    });
    const amb = await startAmbassador(runtime, {
      UPSTREAM_URL: up.url,
      MAX_IN_FLIGHT: '3',
      QUEUE_SIZE: '2',
      QUEUE_TIMEOUT_MS: '10000',
    });
    const results = Array.from(
      { length: 10 },
      () =>
        fetch(`${amb.url}/x`).then(async (r) => ({
          status: r.status,
          retryAfter: r.headers.get('retry-after'),
          text: await r.text(),
        })),
    );
    // Three in flight, two queued, five refused: wait for that state rather than for a fixed time.
    await waitFor(
      'three held and two queued',
      async () =>
        held.length >= 3 && (await scrape(amb)).get('ambassador_upstream_queued_requests{route="default"}') === 2,
    );
    await waitFor(
      'five refused',
      async () =>
        (await scrape(amb)).get('ambassador_requests_rejected_total{route="default",reason="concurrency"}') === 5,
    );
    expect(up.seen.length).toBe(3);
    for (const r of held) r.end('ok');
    while (held.length < 5) await sleep(5);
    for (const r of held) if (!r.writableEnded) r.end('ok');
    const all = await Promise.all(results);
    expect(all.filter((r) => r.status === 200)).toHaveLength(5);
    const refused = all.filter((r) => r.status === 503);
    expect(refused).toHaveLength(5);
    expect(refused[0].retryAfter).toBe('1');
    expect(refused[0].text).toMatch(/overloaded: 3 requests in flight to default/);
    expect(up.seen.length).toBe(5);
    expect(most).toBe(3);
    const m = await scrape(amb);
    expect(m.get('ambassador_requests_rejected_total{route="default",reason="concurrency"}')).toBe(5);
    expect(m.get('ambassador_upstream_active_requests{route="default"}')).toBe(0);
  });

  it('answers 503 when a queued request has waited QUEUE_TIMEOUT_MS', async () => {
    const held: http.ServerResponse[] = [];
    const up = await startUpstream((_q, res) => void held.push(res));
    const amb = await startAmbassador(runtime, {
      UPSTREAM_URL: up.url,
      MAX_IN_FLIGHT: '1',
      QUEUE_SIZE: '5',
      QUEUE_TIMEOUT_MS: '200',
    });
    const first = fetch(`${amb.url}/x`);
    while (held.length < 1) await sleep(5);
    const t0 = performance.now();
    expect((await fetch(`${amb.url}/x`)).status).toBe(503);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(190);
    held[0].end('ok');
    expect((await first).status).toBe(200);
    expect(up.seen.length).toBe(1);
  });

  it('holds the rate limit exactly: the burst passes, the rest get 429 with Retry-After', async () => {
    const up = await startUpstream();
    const amb = await startAmbassador(runtime, {
      UPSTREAM_URL: up.url,
      RATE_LIMIT_PER_SEC: '1',
      RATE_LIMIT_BURST: '5',
    });
    const t0 = performance.now();
    const all = await Promise.all(
      Array.from({ length: 20 }, () =>
        fetch(`${amb.url}/x`).then(async (r) => ({
          status: r.status,
          retryAfter: r.headers.get('retry-after'),
          text: await r.text(),
        }))),
    );
    // The burst of 5, plus one token for each whole second the burst took to arrive (on a loaded machine
    // it may straddle a second or two).
    const refills = Math.floor((performance.now() - t0) / 1000);
    const passed = all.filter((r) => r.status === 200).length;
    expect(passed).toBeGreaterThanOrEqual(5);
    expect(passed).toBeLessThanOrEqual(5 + refills);
    const limited = all.filter((r) => r.status === 429);
    expect(limited).toHaveLength(20 - passed);
    expect(limited.every((r) => r.retryAfter === '1')).toBe(true);
    expect(limited[0].text).toMatch(/rate limit: over 1\/s \(burst 5\) to default/);
    expect(up.seen.length).toBe(passed);
    expect((await scrape(amb)).get('ambassador_requests_rejected_total{route="default",reason="rate_limit"}')).toBe(
      20 - passed,
    );
  });

  it('with RATE_LIMIT_WAIT_MS, makes a burst wait its turn instead of refusing it', async () => {
    const up = await startUpstream();
    const amb = await startAmbassador(runtime, {
      UPSTREAM_URL: up.url,
      RATE_LIMIT_PER_SEC: '20',
      RATE_LIMIT_BURST: '1',
      RATE_LIMIT_WAIT_MS: '2000',
    });
    const t0 = performance.now();
    const all = await Promise.all(Array.from({ length: 8 }, () => fetch(`${amb.url}/x`).then((r) => r.status)));
    expect(all.every((s) => s === 200)).toBe(true);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(7 * 50 - 10); // one token every 50 ms
    expect(up.seen.length).toBe(8);
  });

  it('serves its queue in arrival order: with the one place held, three queued reach the upstream as they came', async () => {
    const release: Array<() => void> = [];
    const up = await startUpstream((req, res) => void release.push(() => res.end(req.url)));
    const amb = await startAmbassador(runtime, {
      UPSTREAM_URL: up.url,
      MAX_IN_FLIGHT: '1',
      QUEUE_SIZE: '3',
      QUEUE_TIMEOUT_MS: '20000',
      QUEUE_NEWEST_FIRST_MS: '0', // however long this machine takes between the steps
    });
    const queued = () => scrape(amb).then((m) => m.get('ambassador_upstream_queued_requests{route="default"}'));
    const answers = [fetch(`${amb.url}/holder`)];
    await waitFor('the holder at the upstream', () => up.seen.length === 1);
    for (const name of ['first', 'second', 'third']) {
      answers.push(fetch(`${amb.url}/${name}`));
      await waitFor(`${name} in the queue`, async () => (await queued()) === answers.length - 1);
    }
    // One place is given back at a time; each goes to the one that has waited longest.
    for (let i = 0; i < 4; i++) {
      await waitFor(`request ${i + 1} at the upstream`, () => up.seen.length === i + 1);
      release[i]();
    }
    expect(await Promise.all(answers.map(async (a) => (await a).text()))).toEqual([
      '/holder',
      '/first',
      '/second',
      '/third',
    ]);
    expect(up.seen.map((s) => s.url)).toEqual(['/holder', '/first', '/second', '/third']);
  });

  it.each([
    ["the route's queue (MAX_IN_FLIGHT)", { MAX_IN_FLIGHT: '1', QUEUE_SIZE: '10', QUEUE_TIMEOUT_MS: '20000' }],
    ["the process's queue (PROCESS_MAX_IN_FLIGHT)", { PROCESS_MAX_IN_FLIGHT: '1' }],
  ])('once %s has stood QUEUE_NEWEST_FIRST_MS, gives the next place to the newest', async (_name, limit) => {
    const release: Array<() => void> = [];
    const up = await startUpstream((req, res) => void release.push(() => res.end(req.url)));
    const amb = await startAmbassador(runtime, { UPSTREAM_URL: up.url, QUEUE_NEWEST_FIRST_MS: '400', ...limit });
    const metric = 'PROCESS_MAX_IN_FLIGHT' in limit
      ? 'ambassador_process_queued_requests'
      : 'ambassador_upstream_queued_requests{route="default"}';
    const queued = () => scrape(amb).then((m) => m.get(metric));
    const answers = [fetch(`${amb.url}/holder`)];
    await waitFor('the holder at the upstream', () => up.seen.length === 1);
    for (const name of ['old', 'older-than-400-ms']) {
      answers.push(fetch(`${amb.url}/${name}`));
      await waitFor(`${name} in the queue`, async () => (await queued()) === answers.length - 1);
    }
    await sleep(500); // the first in line has waited past QUEUE_NEWEST_FIRST_MS: the queue stands
    answers.push(fetch(`${amb.url}/newest`));
    await waitFor('newest in the queue', async () => (await queued()) === 3);
    release[0]();
    await waitFor('the next at the upstream', () => up.seen.length === 2);
    expect(up.seen[1].url).toBe('/newest');
    release[1]();
    await waitFor('the one after at the upstream', () => up.seen.length === 3);
    expect(up.seen[2].url).toBe('/older-than-400-ms'); // still standing: the newest of those left
    release[2]();
    await waitFor('the last at the upstream', () => up.seen.length === 4);
    release[3]();
    expect(await Promise.all(answers.map(async (a) => (await a).status))).toEqual([200, 200, 200, 200]);
    expect(up.seen.map((s) => s.url)).toEqual(['/holder', '/newest', '/older-than-400-ms', '/old']);
  });

  it('holds a place from admission to the end of the response body, not to its headers', async () => {
    let finish!: () => void;
    const up = await startUpstream((req, res) => {
      if (req.url !== '/stream') return void res.end('ok');
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.write('first part;');
      finish = () => res.end('last part');
    });
    const amb = await startAmbassador(runtime, { UPSTREAM_URL: up.url, MAX_IN_FLIGHT: '1', QUEUE_SIZE: '0' });
    const res = await fetch(`${amb.url}/stream`);
    const reader = res.body!.getReader();
    await reader.read(); // the headers and the first part are here; the rest is still to come
    expect((await scrape(amb)).get('ambassador_upstream_active_requests{route="default"}')).toBe(1);
    expect((await fetch(`${amb.url}/second`)).status).toBe(503);
    finish();
    while (!(await reader.read()).done);
    await waitFor(
      'the place given back',
      async () => (await scrape(amb)).get('ambassador_upstream_active_requests{route="default"}') === 0,
      3000,
    );
    expect((await fetch(`${amb.url}/third`)).status).toBe(200);
  });

  it('holds PROCESS_MAX_IN_FLIGHT over every route together: the next wait their turn, none refused', async () => {
    const held: Array<() => void> = [];
    const up = await startUpstream((req, res) => void held.push(() => res.end(req.url)));
    const amb = await startAmbassador(runtime, {
      ROUTES_FILE: routesFile([
        { name: 'a', prefix: '/a', upstream: up.url },
        { name: 'b', prefix: '/b', upstream: up.url },
      ]),
      PROCESS_MAX_IN_FLIGHT: '2',
    });
    expect((await scrape(amb)).get('ambassador_process_max_in_flight')).toBe(2);
    const answers = ['/a/1', '/b/2', '/a/3', '/b/4'].map((path) => fetch(`${amb.url}${path}`));
    await waitFor(
      'two at the upstream and two waiting',
      async () => up.seen.length === 2 && (await scrape(amb)).get('ambassador_process_queued_requests') === 2,
    );
    await sleep(100);
    expect(up.seen.length).toBe(2); // nothing more gets through while both places are held
    expect((await scrape(amb)).get('ambassador_process_in_flight_requests')).toBe(2);
    held[0]();
    await waitFor('the third at the upstream', () => up.seen.length === 3);
    held[1]();
    await waitFor('the fourth at the upstream', () => up.seen.length === 4);
    held[2]();
    held[3]();
    const all = await Promise.all(answers.map(async (a) => [(await a).status, await (await a).text()]));
    expect(all.map(([status]) => status)).toEqual([200, 200, 200, 200]);
    expect(all.map(([, text]) => text).sort()).toEqual(['/a/1', '/a/3', '/b/2', '/b/4']);
    const m = await scrape(amb);
    expect(m.get('ambassador_process_in_flight_requests')).toBe(0);
    expect(m.get('ambassador_process_queued_requests')).toBe(0);
  });

  it('keeps a process place to the end of a long body only; a short or unsized one gives it back at the head', async () => {
    const ends: Array<() => void> = [];
    const long = Buffer.alloc(100 * 1024, 'l');
    const up = await startUpstream((req, res) => {
      if (req.url === '/long') res.writeHead(200, { 'content-length': String(long.length) });
      else res.writeHead(200, req.url === '/sized' ? { 'content-length': '5' } : {});
      const body = req.url === '/long' ? long : Buffer.from('short');
      res.write(body.subarray(0, 1));
      ends.push(() => res.end(body.subarray(1)));
    });
    const amb = await startAmbassador(runtime, { UPSTREAM_URL: up.url, PROCESS_MAX_IN_FLIGHT: '1' });
    const places = async () => (await scrape(amb)).get('ambassador_process_in_flight_requests');
    // A body of unknown length (a stream that may never end) gives its place back with the head.
    const unsized = await fetch(`${amb.url}/unsized`);
    const reader = unsized.body!.getReader();
    await reader.read();
    expect(await places()).toBe(0);
    // A long body keeps it until its last byte: the next request waits, and is not refused.
    const longRes = await fetch(`${amb.url}/long`);
    expect(await places()).toBe(1);
    const next = fetch(`${amb.url}/sized`);
    await waitFor(
      'the next one waiting',
      async () => (await scrape(amb)).get('ambassador_process_queued_requests') === 1,
    );
    expect(up.seen.length).toBe(2);
    ends[1]();
    expect((await longRes.arrayBuffer()).byteLength).toBe(long.length);
    await waitFor('the next one at the upstream', () => up.seen.length === 3);
    ends[2]();
    expect(await (await next).text()).toBe('short');
    ends[0]();
    while (!(await reader.read()).done);
    await waitFor('every place given back', async () => (await places()) === 0);
  });

  it('answers 503 to a request that found no place within its REQUEST_TIMEOUT_MS, and never sends it', async () => {
    const held: http.ServerResponse[] = [];
    const up = await startUpstream((_q, res) => void held.push(res));
    // The holder's route has no timeout of its own; the waiting request's has 300 ms.
    const amb = await startAmbassador(runtime, {
      ROUTES_FILE: routesFile([
        { name: 'holder', prefix: '/holder', upstream: up.url, requestTimeoutMs: 0, tryTimeoutMs: 0 },
        { name: 'default', prefix: '/', upstream: up.url, requestTimeoutMs: 300, tryTimeoutMs: 0 },
      ]),
      PROCESS_MAX_IN_FLIGHT: '1',
    });
    const first = fetch(`${amb.url}/holder`);
    await waitFor('the holder at the upstream', () => held.length === 1);
    const t0 = performance.now();
    const second = await fetch(`${amb.url}/second`);
    expect(second.status).toBe(503);
    expect(second.headers.get('retry-after')).toBe('1');
    expect(await second.text()).toMatch(/in flight in all \(PROCESS_MAX_IN_FLIGHT\).*REQUEST_TIMEOUT_MS \(300 ms\)/);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(250);
    expect(up.seen.map((s) => s.url)).toEqual(['/holder']);
    const m = await scrape(amb);
    expect(m.get('ambassador_requests_rejected_total{route="default",reason="concurrency"}')).toBe(1);
    // The route's own place, held while it waited for the process's, went back with the 503.
    expect(m.get('ambassador_upstream_active_requests{route="default"}')).toBe(0);
    expect(m.get('ambassador_process_queued_requests')).toBe(0);
    held[0].end('ok');
    expect((await first).status).toBe(200);
  });

  it('holds the rate limit at its rate over seconds, not only over a burst', async () => {
    const up = await startUpstream();
    const amb = await startAmbassador(runtime, {
      UPSTREAM_URL: up.url,
      RATE_LIMIT_PER_SEC: '20',
      RATE_LIMIT_BURST: '1',
      LOG_LEVEL: 'warn',
    });
    // Four clients as fast as they can for 2.5 s: about 20 a second pass (the burst of 1, then refills).
    const stopAt = performance.now() + 2500;
    let passed = 0;
    let refused = 0;
    await Promise.all(Array.from({ length: 4 }, async () => {
      while (performance.now() < stopAt) {
        const r = await fetch(`${amb.url}/r`);
        await r.arrayBuffer();
        if (r.status === 200) passed++;
        else if (r.status === 429) refused++;
      }
    }));
    expect(refused).toBeGreaterThan(passed);
    expect(up.seen.length).toBe(passed);
    // 2.5 s at 20/s plus the burst: 51, with room for a loaded machine's slower clients; twice the rate would be ~100.
    expect(passed).toBeGreaterThanOrEqual(35);
    expect(passed).toBeLessThanOrEqual(56);
  });
});

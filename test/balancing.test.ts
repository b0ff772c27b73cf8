/** Load balancing by power of two choices over in-flight requests and a latency average: real upstreams of different speeds, counted at the upstream. */
import { describe, expect, it } from 'vitest';
import { ARTIFACTS, deadPort, scrape, startAmbassador, startUpstream, stopAfterEach } from './helpers.ts';

describe.each(ARTIFACTS)('load balancing on real upstreams (%s)', (runtime) => {
  stopAfterEach();

  it('sends a slow endpoint less traffic than a fast one', async () => {
    const fast = await startUpstream((_q, res) => res.end('fast'));
    const slow = await startUpstream((_q, res) => setTimeout(() => res.end('slow'), 40));
    const amb = await startAmbassador(runtime, { UPSTREAM_URL: `${fast.url},${slow.url}`, LOG_LEVEL: 'warn' });
    let left = 300;
    await Promise.all(Array.from({ length: 6 }, async () => {
      while (left-- > 0) expect((await fetch(`${amb.url}/x`)).status).toBe(200);
    }));
    expect(fast.seen.length + slow.seen.length).toBe(300);
    // Round robin would give each 150; P2C on latency gives the slow one a small share.
    expect(slow.seen.length).toBeLessThan(300 * 0.2);
    expect(slow.seen.length).toBeGreaterThan(0); // still tried now and then: it is not written off
  });

  it('gives a refusing endpoint a failure penalty, so it does not win the first pick of every request when no breaker hides it', async () => {
    const healthy = await startUpstream((_q, res) => res.end('ok'));
    const dead = `127.0.0.1:${await deadPort()}`;
    const amb = await startAmbassador(runtime, {
      UPSTREAM_URL: `http://${dead},${healthy.url}`,
      BREAKER_FAILURES: '0',
      RETRY_ATTEMPTS: '2',
      LOG_LEVEL: 'warn',
    });
    for (let i = 0; i < 30; i++) expect((await fetch(`${amb.url}/x`)).status).toBe(200);
    expect(healthy.seen.length).toBe(30);
    // A refused attempt answers in well under a millisecond: without a penalty the dead endpoint looks the
    // cheapest and takes every first attempt (30 retries). With one, it is tried about once.
    const m = await scrape(amb);
    expect(m.get(`ambassador_upstream_endpoint_requests_total{route="default",endpoint="${dead}"}`))
      .toBeLessThanOrEqual(2);
  });
});
